//! The highest epoch the proxy has seen per session, kept across its
//! restarts (I4): a restarted proxy never routes below it, and never
//! trusts a read-write probe for a session whose agents reported an epoch
//! before. One small file per session in the proxy's `state_dir`, written
//! to a temporary file, synced and renamed, so a crash leaves the old or
//! the new value, never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::roles::Epoch;

#[derive(Debug, thiserror::Error)]
pub enum EpochStoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not an epoch ({text:?}); remove the file only if no failover happened since")]
    Corrupt { path: PathBuf, text: String },
}

/// Where one session's highest epoch is kept.
#[derive(Debug, Clone)]
pub struct EpochStore {
    path: PathBuf,
}

impl EpochStore {
    pub fn new(state_dir: &Path, session: &str) -> Self {
        EpochStore {
            path: state_dir.join(format!("{session}.epoch")),
        }
    }

    /// The epoch saved before, or None on the first start.
    pub fn load(&self) -> Result<Option<Epoch>, EpochStoreError> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(EpochStoreError::Io {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        text.trim()
            .parse()
            .map(|epoch| Some(Epoch(epoch)))
            .map_err(|_| EpochStoreError::Corrupt {
                path: self.path.clone(),
                text,
            })
    }

    /// Saves `epoch` durably before the caller routes by it.
    pub fn save(&self, epoch: Epoch) -> Result<(), EpochStoreError> {
        let io = |source| EpochStoreError::Io {
            path: self.path.clone(),
            source,
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(io)?;
        let temporary = self.path.with_extension("epoch.tmp");
        let mut file = File::create(&temporary).map_err(io)?;
        file.write_all(format!("{}\n", epoch.0).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io)?;
        fs::rename(&temporary, &self.path).map_err(io)?;
        File::open(dir).and_then(|dir| dir.sync_all()).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_epoch_survives_and_garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EpochStore::new(dir.path(), "shop");
        assert_eq!(store.load().unwrap(), None);
        store.save(Epoch(7)).unwrap();
        assert_eq!(
            EpochStore::new(dir.path(), "shop").load().unwrap(),
            Some(Epoch(7))
        );
        std::fs::write(dir.path().join("shop.epoch"), "seven").unwrap();
        assert!(store
            .load()
            .unwrap_err()
            .to_string()
            .contains("not an epoch"));
    }
}
