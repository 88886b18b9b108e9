#!/usr/bin/env python3
"""The web console in Firefox: signs in, approves a held request, opens every
page, and reports any page error. Firefox is driven over Marionette, its own
remote protocol (pip's marionette_driver), because geckodriver is not packaged
for Debian; the suite's browser tests run in Chromium (tests/console.rs).

Usage: console_firefox.py URL ADMIN_TOKEN CA_PEM APPROVAL_ID OUT_DIR
Needs: apt-get install firefox-esr libnss3-tools; pip install marionette_driver.
Prints 'ok' or 'FAIL: ...'; saves a screenshot of each page to OUT_DIR."""
import base64, os, socket, subprocess, sys, tempfile, time

from marionette_driver.by import By
from marionette_driver.marionette import Marionette

url, token, ca, approval, out = sys.argv[1:6]

def free_port():
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close(); return p

profile = tempfile.mkdtemp(prefix="keyward-firefox-")
subprocess.run(["certutil", "-N", "-d", f"sql:{profile}", "--empty-password"], check=True)
# keyward's CA, trusted for TLS servers in this profile only.
subprocess.run(["certutil", "-A", "-d", f"sql:{profile}", "-n", "keyward", "-t", "C,,", "-i", ca], check=True)
port = free_port()
with open(os.path.join(profile, "user.js"), "w") as prefs:
    prefs.write(f'user_pref("marionette.port", {port});\n')
    prefs.write('user_pref("browser.shell.checkDefaultBrowser", false);\n')
firefox = subprocess.Popen(["firefox-esr", "--headless", "--marionette", "--no-remote", "--profile", profile],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
m = Marionette(host="127.0.0.1", port=port)
try:
    m.raise_for_port(timeout=60)
    m.start_session()
    m.set_window_rect(width=1400, height=1000)

    def shot(name):
        with open(os.path.join(out, f"firefox-{name}.png"), "wb") as f:
            f.write(base64.b64decode(m.screenshot()))

    def wait(css, limit=15):
        end = time.time() + limit
        while time.time() < end:
            found = m.find_elements(By.CSS_SELECTOR, css)
            if found:
                return found[0]
            time.sleep(0.2)
        raise AssertionError(f"no {css} on {m.get_url()}")

    # Errors a page raises (a CSP violation, a script error) are collected
    # by listeners added before each check.
    collect = """window.__errors = window.__errors || [];
      document.addEventListener('securitypolicyviolation', e => window.__errors.push('CSP: ' + e.violatedDirective));
      window.addEventListener('error', e => window.__errors.push(String(e.message)));"""

    m.navigate(url + "/ui/")
    wait("input[name=token]").send_keys(token)
    shot("login")
    wait("main[data-login] form button[type=submit]").click()
    wait("main[data-page=dashboard]")
    m.navigate(url + "/ui/approvals")
    m.execute_script(collect)
    row = f'tr[data-approval-id="{approval}"]'
    wait(row)
    shot("approvals")
    wait(row + " [data-action=approve]").click()
    wait("[data-notice=approved]")
    for page in ["/ui/", "/ui/approvals", "/ui/agents", "/ui/anomalies", "/ui/audit", "/ui/policy"]:
        m.navigate(url + page)
        m.execute_script(collect)
        wait("main[data-page]")
        time.sleep(2.5)  # one live refresh on the queue
        errors = m.execute_script("return window.__errors")
        if errors:
            raise AssertionError(f"{page}: {errors}")
        shot(page.strip("/").replace("/", "-") or "dashboard")
    print("ok")
except Exception as e:  # noqa: BLE001 - any failure is the report
    print(f"FAIL: {e}")
    sys.exit(1)
finally:
    try:
        m.delete_session()
    except Exception:  # noqa: BLE001
        pass
    firefox.terminate()
