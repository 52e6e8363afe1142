//! `profile_service`: an HTTP service (axum) that keeps user profiles in a write-behind cache
//! in front of SQLite (or PostgreSQL), through [`AsyncCache`].
//!
//! ```text
//! GET  /profiles/{id}                  the profile, read through the cache (404 if none)
//! POST /profiles/{id}/visit?page=/home one more visit, and the last page seen: an atomic
//!                                      read-modify-write of the profile (404 if none)
//! PUT  /profiles/{id}                  {"name": "..."}: creates the profile or renames it,
//!                                      keeping its visits
//! ```
//!
//! Run it, load it, stop it with Ctrl-C (or SIGTERM): it stops accepting connections, closes
//! the cache (writing what is pending) and prints how many writes it could not write.
//!
//! ```sh
//! cargo run --release --example profile_service --features tokio,sqlite -- --db profiles.db
//! curl -X POST 'http://127.0.0.1:3000/profiles/7/visit?page=/home'
//! curl http://127.0.0.1:3000/profiles/7
//! ```
//!
//! Options: `--addr HOST:PORT` (127.0.0.1:3000), `--db PATH` (profiles.db), `--postgres URL`
//! (with the `postgres` feature), `--profiles N` (makes sure profiles 1..=N exist, 10000),
//! `--write-through` (every write goes to the database before the request answers),
//! `--write-delay-ms MS` (the write-behind staleness bound, 1000).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use writebehind::stores::{Codec, CodecError, Raw, SqliteStore};
use writebehind::{AsyncCache, Cache, CloseReport, Error, Store, Write, WriteMode};

/// A user profile: the value the cache holds for a user id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// Display name.
    pub name: String,
    /// Visits counted by `POST /profiles/{id}/visit`.
    pub visits: u64,
    /// The page of the last visit (empty before the first).
    pub last_page: String,
}

/// Stores a [`Profile`] as JSON in the value column.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProfileJson;

impl Codec<Profile> for ProfileJson {
    fn encode(&self, p: &Profile) -> Result<Vec<u8>, CodecError> {
        Ok(serde_json::to_vec(p)?)
    }

    fn decode(&self, bytes: &[u8]) -> Result<Profile, CodecError> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// The table the profiles live in.
pub const TABLE: &str = "profiles";
/// Longest name or page the service accepts, in bytes.
pub const MAX_TEXT: usize = 256;

/// Opens (or creates) the SQLite database at `path`.
///
/// # Errors
/// When the database cannot be opened or its `profiles` table has another layout.
pub fn open_sqlite(path: &std::path::Path) -> Result<SqliteStore<u64, Profile>, String> {
    SqliteStore::builder(path, TABLE, Raw, ProfileJson)
        .open()
        .map_err(|e| format!("cannot open the SQLite database {}: {e}", path.display()))
}

/// Makes sure profiles `1..=n` exist, named `user-{id}`. Written at version 1, below every
/// version a cache writes, so a profile the service has written is left as it is.
///
/// # Errors
/// When the store refuses a batch.
pub fn seed(store: &dyn Store<u64, Profile>, n: u64) -> Result<(), String> {
    let mut batch = Vec::with_capacity(1000);
    for id in 1..=n {
        batch.push(Write::Put {
            key: id,
            value: Profile {
                name: format!("user-{id}"),
                visits: 0,
                last_page: String::new(),
            },
            version: 1,
        });
        if batch.len() == 1000 || id == n {
            store
                .write_all(&batch)
                .map_err(|e| format!("cannot seed the profiles: {e}"))?;
            batch.clear();
        }
    }
    Ok(())
}

/// The cache in front of `store`: write-behind with `write_delay`, or write-through.
///
/// # Errors
/// As [`writebehind::Builder::build`].
pub fn build_cache(
    store: Arc<dyn Store<u64, Profile>>,
    write_through: bool,
    write_delay: Duration,
) -> Result<AsyncCache<u64, Profile>, Error> {
    let mode = if write_through {
        WriteMode::Through
    } else {
        WriteMode::Behind
    };
    Ok(Cache::builder(store)
        .write_mode(mode)
        .write_delay(write_delay)
        .name("profiles")
        .build()?
        .into_async())
}

/// The service's routes over `cache`.
pub fn router(cache: AsyncCache<u64, Profile>) -> Router {
    Router::new()
        .route("/profiles/{id}", get(read_profile).put(put_profile))
        .route("/profiles/{id}/visit", post(visit))
        .with_state(cache)
}

/// Serves `router(cache)` on `listener` until `shutdown` completes, then stops accepting,
/// lets the requests in progress finish, closes the cache and returns its report.
///
/// # Errors
/// When the server fails (the cache is closed all the same).
pub async fn serve(
    listener: tokio::net::TcpListener,
    cache: AsyncCache<u64, Profile>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<CloseReport<u64, Profile>, std::io::Error> {
    let served = axum::serve(listener, router(cache.clone()))
        .with_graceful_shutdown(shutdown)
        .await;
    let report = cache.close(Duration::from_secs(10)).await;
    served.map(|()| report)
}

/// An error answer: a status and a message.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, self.1).into_response()
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match e {
            Error::Backpressure { .. } | Error::Closed => StatusCode::SERVICE_UNAVAILABLE,
            Error::Load(_) | Error::Store(_) => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, format!("{e}\n"))
    }
}

fn not_found(id: u64) -> Failure {
    Failure(StatusCode::NOT_FOUND, format!("no profile {id}\n"))
}

fn check_len(what: &str, text: &str) -> Result<(), Failure> {
    if text.len() > MAX_TEXT {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            format!(
                "{what} is {} bytes; at most {MAX_TEXT} are accepted\n",
                text.len()
            ),
        ));
    }
    Ok(())
}

async fn read_profile(
    State(cache): State<AsyncCache<u64, Profile>>,
    Path(id): Path<u64>,
) -> Result<Json<Profile>, Failure> {
    match cache.get(&id).await? {
        Some(p) => Ok(Json(p)),
        None => Err(not_found(id)),
    }
}

/// The query of a visit.
#[derive(Debug, Deserialize)]
struct VisitQuery {
    page: Option<String>,
}

async fn visit(
    State(cache): State<AsyncCache<u64, Profile>>,
    Path(id): Path<u64>,
    Query(q): Query<VisitQuery>,
) -> Result<Json<Profile>, Failure> {
    let page = q.page.unwrap_or_else(|| "/".to_string());
    check_len("page", &page)?;
    let computed = cache
        .compute(&id, move |p| {
            p.map(|p| Profile {
                visits: p.visits.saturating_add(1),
                last_page: page,
                ..p.clone()
            })
        })
        .await?;
    computed.value.map(Json).ok_or_else(|| not_found(id))
}

/// The body of `PUT /profiles/{id}`.
#[derive(Debug, Deserialize)]
struct NewProfile {
    name: String,
}

async fn put_profile(
    State(cache): State<AsyncCache<u64, Profile>>,
    Path(id): Path<u64>,
    Json(body): Json<NewProfile>,
) -> Result<Json<Profile>, Failure> {
    check_len("name", &body.name)?;
    let computed = cache
        .compute(&id, move |p| {
            Some(Profile {
                name: body.name,
                visits: p.map_or(0, |p| p.visits),
                last_page: p.map(|p| p.last_page.clone()).unwrap_or_default(),
            })
        })
        .await?;
    computed
        .value
        .map(Json)
        .ok_or_else(|| Failure(StatusCode::INTERNAL_SERVER_ERROR, "no value\n".into()))
}

/// The command line.
struct Args {
    addr: String,
    db: std::path::PathBuf,
    postgres: Option<String>,
    profiles: u64,
    write_through: bool,
    write_delay: Duration,
}

const USAGE: &str = "usage: profile_service [--addr HOST:PORT] [--db PATH | --postgres URL] \
[--profiles N] [--write-through] [--write-delay-ms MS]";

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut a = Args {
        addr: "127.0.0.1:3000".to_string(),
        db: "profiles.db".into(),
        postgres: None,
        profiles: 10_000,
        write_through: false,
        write_delay: Duration::from_secs(1),
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or(format!("{flag} needs a value\n{USAGE}"));
        match flag.as_str() {
            "--addr" => a.addr = value()?,
            "--db" => a.db = value()?.into(),
            "--postgres" => a.postgres = Some(value()?),
            "--profiles" => {
                a.profiles = value()?
                    .parse()
                    .map_err(|e| format!("--profiles: {e}\n{USAGE}"))?;
            }
            "--write-delay-ms" => {
                let ms = value()?
                    .parse()
                    .map_err(|e| format!("--write-delay-ms: {e}\n{USAGE}"))?;
                a.write_delay = Duration::from_millis(ms);
            }
            "--write-through" => a.write_through = true,
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown option {other:?}\n{USAGE}")),
        }
    }
    Ok(a)
}

#[cfg(feature = "postgres")]
fn open_postgres(url: &str) -> Result<Arc<dyn Store<u64, Profile>>, String> {
    let store = writebehind::stores::PostgresStore::builder(url, TABLE, Raw, ProfileJson)
        .connect()
        .map_err(|e| format!("cannot use PostgreSQL: {e}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_url: &str) -> Result<Arc<dyn Store<u64, Profile>>, String> {
    Err("--postgres needs the `postgres` feature: --features tokio,sqlite,postgres".into())
}

/// Completes on Ctrl-C or, on Unix, SIGTERM.
async fn stop_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            eprintln!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                eprintln!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Opening and seeding block on the database: not on a runtime thread.
    let (store, label) = tokio::task::spawn_blocking(move || {
        let (store, label): (Arc<dyn Store<u64, Profile>>, String) = match &args.postgres {
            Some(url) => (open_postgres(url)?, "PostgreSQL".to_string()),
            None => (
                Arc::new(open_sqlite(&args.db)?),
                format!("SQLite {}", args.db.display()),
            ),
        };
        seed(&*store, args.profiles)?;
        Ok::<_, String>((store, label))
    })
    .await
    .map_err(|e| format!("opening the store failed: {e}"))??;
    let cache = build_cache(store, args.write_through, args.write_delay)
        .map_err(|e| format!("cannot build the cache: {e}"))?;
    let listener = tokio::net::TcpListener::bind(&args.addr)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let mode = if args.write_through {
        "write-through"
    } else {
        "write-behind"
    };
    println!(
        "profile_service: http://{} ({mode}, {label}, profiles 1..={})",
        args.addr, args.profiles
    );
    let report = serve(listener, cache, stop_signal())
        .await
        .map_err(|e| format!("the server failed: {e}"))?;
    println!(
        "closed: {} unwritten write(s){}",
        report.unwritten.len(),
        if report.deadline_reached {
            " (the close deadline passed)"
        } else {
            ""
        }
    );
    if report.is_clean() {
        Ok(())
    } else {
        Err("some writes did not reach the store".into())
    }
}

fn main() -> std::process::ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            return std::process::ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("profile_service: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}
