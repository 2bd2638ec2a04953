//! Read-only connections for queries and status, used on the blocking pool so
//! no SQLite call ever runs on an async worker or across an `.await`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

use super::Error;

/// Most idle reader connections kept open.
const MAX_IDLE: usize = 4;

/// A small pool of read-only connections to the site log.
#[derive(Clone)]
pub struct Readers {
    path: Arc<PathBuf>,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl Readers {
    /// Readers for the log at `path` (which must already exist).
    pub fn new(path: PathBuf) -> Self {
        Self { path: Arc::new(path), idle: Arc::new(Mutex::new(Vec::new())) }
    }

    /// Runs `f` on a reader connection on the blocking pool.
    pub async fn with<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, Error> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.with_blocking(f)).await.map_err(|e| Error::Join(e.to_string()))?
    }

    /// Runs `f` on a reader connection on this thread.
    fn with_blocking<T>(&self, f: impl FnOnce(&Connection) -> Result<T, Error>) -> Result<T, Error> {
        let conn = self.idle.lock().ok().and_then(|mut v| v.pop());
        let conn = match conn {
            Some(c) => c,
            None => super::open(&self.path, true)?,
        };
        let result = f(&conn);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < MAX_IDLE
        {
            idle.push(conn);
        }
        result
    }
}
