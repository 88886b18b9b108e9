//! A real headless Chromium (Debian's `chromium`), driven over WebDriver
//! by its own `chromedriver` process: one browser, with its own profile
//! and cookie jar, per person in a test.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

pub struct Browser {
    pub client: Client,
    driver: Child,
    /// keyward's HTTPS base URL.
    base: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Browser {
    /// A fresh browser for the keyward at `base`. Its CA is keyward's own,
    /// which Chromium does not know: certificate errors are ignored, as
    /// the acceptance check's browser does.
    pub async fn open(base: &str) -> Self {
        assert!(
            std::path::Path::new(CHROMEDRIVER).exists(),
            "{CHROMEDRIVER} is missing: scripts/test.sh installs chromium and chromium-driver"
        );
        // The WebDriver client's TLS stack brings a second crypto provider
        // into the test build; keyward's own is ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--ignore-certificate-errors", "--window-size=1400,1000",
                         "--disable-dev-shm-usage"],
            }),
        );
        let webdriver = format!("http://127.0.0.1:{port}");
        let mut last_error = None;
        for _ in 0..100 {
            match ClientBuilder::rustls()
                .expect("a rustls WebDriver client")
                .capabilities(capabilities.clone())
                .connect(&webdriver)
                .await
            {
                Ok(client) => {
                    return Browser {
                        client,
                        driver,
                        base: base.to_owned(),
                    }
                }
                Err(e) => last_error = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("chromedriver did not start a browser: {last_error:?}");
    }

    pub async fn goto(&self, path: &str) {
        self.client
            .goto(&format!("{}{path}", self.base))
            .await
            .unwrap_or_else(|e| panic!("loading {path}: {e}"));
    }

    /// Waits (up to 15 s) for an element matching `css`.
    pub async fn wait_for(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .client
            .wait()
            .at_most(Duration::from_secs(15))
            .every(Duration::from_millis(100))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(element) => element,
            Err(e) => {
                let url = self.client.current_url().await.map(|u| u.to_string());
                let source = self.client.source().await.unwrap_or_default();
                panic!("no {css} on {url:?}: {e}\n{source}")
            }
        }
    }

    /// Whether an element matching `css` is on the page now.
    pub async fn has(&self, css: &str) -> bool {
        !self
            .client
            .find_all(Locator::Css(css))
            .await
            .unwrap()
            .is_empty()
    }

    /// Signs in through the form, as a person would: types the token and
    /// submits; waits for the dashboard.
    pub async fn sign_in(&self, token: &str) {
        self.goto("/ui/").await;
        let input = self.wait_for("input[name=token]").await;
        input.send_keys(token.trim()).await.unwrap();
        self.client
            .find(Locator::Css("main[data-login] form button[type=submit]"))
            .await
            .unwrap()
            .click()
            .await
            .unwrap();
        self.wait_for("main[data-page=dashboard]").await;
    }

    /// Clicks the element matching `css` inside the element matching
    /// `within`.
    pub async fn click_in(&self, within: &str, css: &str) {
        let container = self.wait_for(within).await;
        container
            .find(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("no {css} in {within}: {e}"))
            .click()
            .await
            .unwrap();
    }

    /// An attribute of the first element matching `css`.
    pub async fn attribute(&self, css: &str, name: &str) -> Option<String> {
        self.wait_for(css).await.attr(name).await.unwrap()
    }

    /// Saves a PNG of the page to `$KEYWARD_CONSOLE_SCREENSHOTS/<name>.png`
    /// when that is set (how `docs/console/` is made).
    pub async fn screenshot(&self, name: &str) {
        if let Ok(dir) = std::env::var("KEYWARD_CONSOLE_SCREENSHOTS") {
            let png = self.client.screenshot().await.unwrap();
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.png")), png).unwrap();
        }
    }

    pub async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
