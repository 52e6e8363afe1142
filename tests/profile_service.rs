//! The `profile_service` example, driven over HTTP on a loopback port: reads through the
//! cache, concurrent visits from many clients, a rename, bad requests, then a graceful
//! shutdown whose close writes everything, and the SQLite database holds every visit.
#![cfg(all(feature = "tokio", feature = "sqlite"))]

#[allow(dead_code)]
#[path = "../examples/profile_service.rs"]
mod profile_service;

use std::sync::Arc;
use std::time::Duration;

use profile_service::{build_cache, open_sqlite, seed, serve, Profile};
use writebehind::Store;

const PROFILES: u64 = 20;
const CLIENTS: u64 = 8;
const VISITS_PER_CLIENT: u64 = 25;
/// The profiles the visits go to: 1..=HOT.
const HOT: u64 = 4;

/// Runs the service on an ephemeral loopback port over a fresh database in `dir`, in
/// write-behind or write-through mode, drives it, shuts it down, and checks the database.
fn drive(write_through: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("profiles.db");
    let store = Arc::new(open_sqlite(&db).unwrap());
    seed(&*store, PROFILES).unwrap();
    // A long write delay: in write-behind mode the visits reach the database at the close.
    let cache = build_cache(store, write_through, Duration::from_secs(60)).unwrap();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, cache, async {
            let _ = stopped.await;
        }));
        let http = reqwest::Client::new();

        // A read through the cache.
        let r = http.get(format!("{base}/profiles/3")).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let p: Profile = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!((p.name.as_str(), p.visits), ("user-3", 0));

        // Bad requests get clear answers, not a dropped connection.
        let r = http
            .get(format!("{base}/profiles/999"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
        let r = http
            .get(format!("{base}/profiles/abc"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let long = "x".repeat(1000);
        let r = http
            .post(format!("{base}/profiles/1/visit?page={long}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        let r = http
            .put(format!("{base}/profiles/1"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_client_error(), "{}", r.status());

        // Concurrent visits from many clients, on a few profiles.
        let clients: Vec<_> = (0..CLIENTS)
            .map(|c| {
                let (http, base) = (http.clone(), base.clone());
                tokio::spawn(async move {
                    for i in 0..VISITS_PER_CLIENT {
                        let id = 1 + (c + i) % HOT;
                        let url = format!("{base}/profiles/{id}/visit?page=/p{c}");
                        let r = http.post(url).send().await.unwrap();
                        assert_eq!(r.status(), 200);
                    }
                })
            })
            .collect();
        for c in clients {
            c.await.unwrap();
        }
        // A visit to a profile that does not exist changes nothing.
        let r = http
            .post(format!("{base}/profiles/999/visit"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);

        // A new profile, then a rename that keeps the visits.
        let r = http
            .put(format!("{base}/profiles/100"))
            .header("content-type", "application/json")
            .body(r#"{"name":"ada"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let r = http
            .put(format!("{base}/profiles/1"))
            .header("content-type", "application/json")
            .body(r#"{"name":"renamed"}"#)
            .send()
            .await
            .unwrap();
        let p: Profile = serde_json::from_str(&r.text().await.unwrap()).unwrap();
        assert_eq!(p.name, "renamed");
        assert_eq!(p.visits, CLIENTS * VISITS_PER_CLIENT / HOT);

        stop.send(()).unwrap();
        server.await.unwrap().unwrap()
    });
    assert!(report.is_clean(), "{} unwritten", report.unwritten.len());
    assert!(!report.deadline_reached);

    // The database, opened afresh, holds every visit.
    let db = open_sqlite(&db).unwrap();
    for id in 1..=HOT {
        let p = db.load(&id).unwrap().unwrap();
        assert_eq!(p.visits, CLIENTS * VISITS_PER_CLIENT / HOT, "profile {id}");
        assert!(p.last_page.starts_with("/p"), "{p:?}");
    }
    assert_eq!(db.load(&1).unwrap().unwrap().name, "renamed");
    assert_eq!(db.load(&100).unwrap().unwrap().name, "ada");
    assert_eq!(db.load(&(HOT + 1)).unwrap().unwrap().visits, 0);
    assert_eq!(db.load(&999).unwrap(), None);
}

#[test]
fn write_behind_service_writes_every_visit_at_shutdown() {
    drive(false);
}

#[test]
fn write_through_service_writes_every_visit() {
    drive(true);
}
