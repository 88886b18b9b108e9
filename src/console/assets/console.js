// keyward console: the one script, loaded from the binary (the CSP allows
// no other). Pages work without it; it only keeps the approvals queue live.
"use strict";

(function () {
  var page = document.querySelector("main[data-page]");
  if (!page || page.getAttribute("data-page") !== "approvals") return;
  var body = document.getElementById("approval-rows");
  if (!body) return;
  var banner = document.getElementById("live-status");
  var stopped = false;

  // Puts the server's rows in place without touching the rows that did
  // not change, so a comment being typed, or a button about to be
  // clicked, stays where it is.
  function merge(html) {
    var template = document.createElement("template");
    template.innerHTML = html;
    var rows = Array.prototype.slice.call(template.content.querySelectorAll("tr[data-approval-id]"));
    rows.forEach(function (row, i) {
      var id = row.getAttribute("data-approval-id");
      var existing = body.querySelector('tr[data-approval-id="' + id + '"]');
      var node = row;
      if (existing && existing.outerHTML === row.outerHTML) {
        node = existing;
      } else if (existing) {
        existing.remove();
      }
      if (body.children[i] !== node) body.insertBefore(node, body.children[i] || null);
    });
    while (body.children.length > rows.length) body.lastElementChild.remove();
    var empty = document.getElementById("approvals-empty");
    if (empty) empty.hidden = rows.length > 0;
  }

  function refresh() {
    if (stopped) return;
    fetch("/ui/approvals/rows" + window.location.search, { credentials: "same-origin", cache: "no-store" })
      .then(function (response) {
        if (response.status === 401) {
          stopped = true;
          if (banner) banner.textContent = "Your session has ended: sign in again to see new requests.";
          return null;
        }
        return response.ok ? response.text() : null;
      })
      .then(function (html) {
        if (html !== null && html !== undefined) merge(html);
      })
      .catch(function () { /* a navigation cut the request short; the next one runs */ });
  }

  setInterval(refresh, 2000);
})();
