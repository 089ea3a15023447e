//! The control-plane page at `/ui`, in Debian's chromium driven through chromium-driver:
//! signing in, an instance appearing and turning `running` without a reload, deleting it
//! from the page, scaling a pool, a bad token refused, a narrow window. Each test saves a
//! screenshot of the pages it shows under `<target dir>/ui-screenshots/`.

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cloudbrain::auth::Scope;
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

use crate::common::TestBroker;

/// A headless chromium session of its own chromium-driver.
struct Browser {
    client: fantoccini::Client,
    driver: Child,
}

impl Browser {
    async fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver, which script/test installs)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver never listened");
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".into(),
            json!({"args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                            "--disable-dev-shm-usage", "--window-size=1200,900"]}),
        );
        let client = ClientBuilder::rustls()
            .unwrap()
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{port}"))
            .await
            .unwrap();
        Self { client, driver }
    }

    async fn sign_in(&self, base: &str, token: &str) {
        self.client.goto(&format!("{base}/ui")).await.unwrap();
        let input = self.find("#token").await;
        input.send_keys(token).await.unwrap();
        self.find("#sign-in button[type=submit]")
            .await
            .click()
            .await
            .unwrap();
    }

    async fn find(&self, css: &str) -> fantoccini::elements::Element {
        (self.client.wait().at_most(Duration::from_secs(20)))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("no {css} on the page: {error}"))
    }

    /// Waits until the element `css` shows `expected` (it may be replaced meanwhile).
    async fn shows(&self, css: &str, expected: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(element) = self.client.find(Locator::Css(css)).await {
                last = element.text().await.unwrap_or_default();
                if last.contains(expected) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css} shows {last:?}, never {expected:?}");
    }

    async fn script(&self, js: &str) -> serde_json::Value {
        self.client.execute(js, vec![]).await.unwrap()
    }

    async fn screenshot(&self, name: &str) {
        let dir = std::path::PathBuf::from(
            std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".to_owned()),
        )
        .join("ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        let png = self.client.screenshot().await.unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }

    async fn close(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// WebDriver's Enter key.
const ENTER: char = '\u{E007}';

/// Every input and select has a name a screen reader reads (a label or `aria-label`).
const UNLABELLED: &str = "return [...document.querySelectorAll('input, select')]
    .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')).length";

#[tokio::test]
async fn a_bad_token_is_refused_with_the_apis_message() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let browser = Browser::start().await;
    let wrong = format!("{}-{}", 1, "0".repeat(32));
    let answer = s.app.client(&wrong).get("/instances").await;
    assert_eq!(answer.status, 401);
    let message = answer.body["errors"][0].as_str().unwrap().to_owned();

    // From the keyboard: the token typed, Enter pressed.
    browser
        .client
        .goto(&format!("{}/ui", s.app.base))
        .await
        .unwrap();
    let input = browser.find("#token").await;
    input.send_keys(&format!("{wrong}{ENTER}")).await.unwrap();
    browser.shows("#error", &message).await;
    assert!(browser.find("#token").await.is_displayed().await.unwrap());
    assert_eq!(browser.script(UNLABELLED).await, json!(0));
    browser.screenshot("sign-in-refused").await;
    browser.close().await;
}

#[tokio::test]
async fn a_client_sees_its_instance_appear_turn_running_and_go_when_deleted_from_the_page() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let browser = Browser::start().await;
    browser.sign_in(&s.app.base, &s.token).await;
    browser.find("#instances").await;

    let id = s.create("ubuntu").await;
    let row = format!("#instances tr[data-id='{id}']");
    browser.shows(&format!("{row} td.state"), "creating").await;
    s.settle(&id, "running").await;
    browser.shows(&format!("{row} td.state"), "running").await;
    assert_eq!(browser.script(UNLABELLED).await, json!(0));
    browser.screenshot("instances").await;

    browser
        .find(&format!("{row} a"))
        .await
        .click()
        .await
        .unwrap();
    browser.shows("[data-field=state]", "running").await;
    browser.shows("#timeline", "→ running").await;
    browser.screenshot("instance").await;
    browser.find("#delete").await.click().await.unwrap();
    browser.client.accept_alert().await.unwrap();
    browser.shows("[data-field=state]", "terminating").await;
    s.settle(&id, "terminated").await;
    browser.shows("[data-field=state]", "terminated").await;
    browser.shows("#timeline", "terminating → terminated").await;

    // A phone's width: nothing wider than the window.
    browser.client.set_window_size(360, 740).await.unwrap();
    browser
        .client
        .goto(&format!("{}/ui#/instances", s.app.base))
        .await
        .unwrap();
    browser
        .shows(&format!("{row} td.state"), "terminated")
        .await;
    let fits = "return document.documentElement.scrollWidth <= window.innerWidth";
    assert_eq!(browser.script(fits).await, json!(true));
    browser.screenshot("instances-narrow").await;
    browser.close().await;
}

#[tokio::test]
async fn an_admin_scales_a_pool_and_watches_it_fill() {
    let s = TestBroker::new()
        .fake(json!({"boot_time_ms": 0}))
        .start()
        .await;
    let admin = s.client_with(Scope::Admin).await;
    let pool = json!({"provider": "fake", "image": "ubuntu", "min_idle": 0, "max_size": 5});
    admin.put("/pools/ci", &pool).await.expect(200);
    let browser = Browser::start().await;
    browser.sign_in(&s.app.base, &admin.token).await;
    browser.find("#instances").await;
    browser
        .client
        .goto(&format!("{}/ui#/pools", s.app.base))
        .await
        .unwrap();
    browser
        .shows("tr[data-pool=ci] [data-count=desired]", "0")
        .await;

    let input = browser.find("#scale-ci").await;
    input.clear().await.unwrap();
    input.send_keys("3").await.unwrap();
    browser
        .find("tr[data-pool=ci] button[type=submit]")
        .await
        .click()
        .await
        .unwrap();
    browser
        .shows("tr[data-pool=ci] [data-count=desired]", "3")
        .await;
    assert_eq!(admin.get("/pools/ci").await.expect(200)["min_idle"], 3);

    crate::common::wait_for("the pool to fill", Duration::from_secs(20), async || {
        s.workers.refresh.reconcile_pools().await;
        s.workers.run_pending_jobs().await;
        s.workers.refresh.refresh_all().await;
        admin.get("/pools/ci").await.expect(200)["counts"]["idle"] == 3
    })
    .await;
    browser
        .shows("tr[data-pool=ci] [data-count=idle]", "3")
        .await;
    browser.screenshot("pools").await;
    browser.close().await;
}

#[tokio::test]
async fn an_admin_revokes_a_token_from_the_page_and_its_holder_is_refused() {
    let s = TestBroker::new().fake(json!({})).api_only().start().await;
    let admin = s.client_with(Scope::Admin).await;
    let holder = s.app.client(&s.token);
    holder.get("/instances").await.expect(200);
    let id = s.token.split('-').next().unwrap();

    // A client is not offered the page.
    let browser = Browser::start().await;
    browser.sign_in(&s.app.base, &s.token).await;
    browser.find("#instances").await;
    assert!(!browser
        .find("#nav-tokens")
        .await
        .is_displayed()
        .await
        .unwrap());

    browser.find("#sign-out").await.click().await.unwrap();
    browser.sign_in(&s.app.base, &admin.token).await;
    browser.find("#instances").await;
    browser.find("#nav-tokens").await.click().await.unwrap();
    let row = format!("#tokens tr[data-token='{id}']");
    browser
        .shows(&format!("{row} [data-field=revoked]"), "active")
        .await;
    assert_eq!(browser.script(UNLABELLED).await, json!(0));
    browser.screenshot("tokens").await;

    browser
        .find(&format!("#revoke-{id}"))
        .await
        .click()
        .await
        .unwrap();
    browser.client.accept_alert().await.unwrap();
    browser
        .shows(&format!("{row} [data-field=revoked]"), "revoked")
        .await;
    crate::common::wait_for(
        "the holder to be refused",
        Duration::from_secs(5),
        async || holder.get("/instances").await.status == 401,
    )
    .await;
    let listed = admin.get("/tokens").await.expect(200);
    let revoked = listed["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"].as_i64() == id.parse().ok());
    assert!(revoked.unwrap()["revoked_at"].is_string(), "{listed}");
    browser.screenshot("tokens-revoked").await;
    browser.close().await;
}
