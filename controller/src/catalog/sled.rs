//! The sled engine: a directory, optimistic transactions, made durable by a
//! flush after every successful write. All tables share one tree; a key is
//! `table NUL key`, so one transaction covers every table.

use std::path::{Path, PathBuf};

use sled::transaction::{
    ConflictableTransactionError, TransactionError, TransactionalTree, UnabortableTransactionError,
};

use super::CatalogError;
use super::store::{Kv, KvCatalog, KvTxn, Table, Visit};

const TREE: &str = "catalog";

fn full_key(table: Table, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(table.name().len() + 1 + key.len());
    k.extend_from_slice(table.name().as_bytes());
    k.push(0);
    k.extend_from_slice(key.as_bytes());
    k
}

fn engine_err(op: &'static str, err: sled::Error) -> CatalogError {
    match err {
        sled::Error::Corruption { at, .. } => CatalogError::Damaged {
            op,
            reason: format!("corruption detected at {at:?}"),
        },
        other => CatalogError::Storage {
            op,
            source: Box::new(other),
        },
    }
}

pub(crate) struct SledKv {
    db: sled::Db,
    tree: sled::Tree,
    path: PathBuf,
}

impl SledKv {
    /// Opens or creates the database directory. Blocking.
    pub(crate) fn open(path: &Path) -> Result<KvCatalog<Self>, CatalogError> {
        let db = sled::Config::new().path(path).open().map_err(|e| match e {
            // sled reports a held lock only as this I/O error text.
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                CatalogError::InUse {
                    path: path.to_path_buf(),
                }
            }
            other => engine_err("open", other),
        })?;
        let tree = db.open_tree(TREE).map_err(|e| engine_err("open", e))?;
        let kv = Self {
            db,
            tree,
            path: path.to_path_buf(),
        };
        tracing::debug!(path = %kv.path.display(), "opened sled catalog");
        KvCatalog::init(kv, path)
    }
}

struct SledTxn<'a> {
    tx: &'a TransactionalTree,
    /// A conflict or storage failure sled must see to retry or fail.
    failed: Option<UnabortableTransactionError>,
    op: &'static str,
}

impl SledTxn<'_> {
    fn fail(&mut self, e: UnabortableTransactionError) -> CatalogError {
        let err = match &e {
            UnabortableTransactionError::Storage(s) => engine_err(self.op, s.clone()),
            UnabortableTransactionError::Conflict => CatalogError::Task {
                op: self.op,
                reason: "transaction conflict".into(),
            },
        };
        self.failed = Some(e);
        err
    }
}

impl KvTxn for SledTxn<'_> {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        match self.tx.get(full_key(table, key)) {
            Ok(v) => Ok(v.map(|v| v.to_vec())),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), CatalogError> {
        match self.tx.insert(full_key(table, key), value) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.fail(e)),
        }
    }

    fn remove(&mut self, table: Table, key: &str) -> Result<bool, CatalogError> {
        match self.tx.remove(full_key(table, key)) {
            Ok(old) => Ok(old.is_some()),
            Err(e) => Err(self.fail(e)),
        }
    }
}

impl Kv for SledKv {
    fn write<T>(
        &self,
        op: &'static str,
        f: &dyn Fn(&mut dyn KvTxn) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let result = self.tree.transaction(|tx| {
            let mut txn = SledTxn {
                tx,
                failed: None,
                op,
            };
            match f(&mut txn) {
                Ok(v) => Ok(v),
                Err(e) => match txn.failed.take() {
                    // Let sled retry on conflict or report storage trouble.
                    Some(unabortable) => Err(unabortable.into()),
                    None => Err(ConflictableTransactionError::Abort(e)),
                },
            }
        });
        match result {
            Ok(v) => {
                self.db.flush().map_err(|e| engine_err(op, e))?;
                Ok(v)
            }
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(engine_err(op, e)),
        }
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let v = self
            .tree
            .get(full_key(table, key))
            .map_err(|e| engine_err("read", e))?;
        Ok(v.map(|v| v.to_vec()))
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        visit: &mut Visit<'_>,
    ) -> Result<(), CatalogError> {
        use std::ops::Bound;
        let strip = table.name().len() + 1;
        let lower = full_key(table, prefix);
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(full_key(table, a)),
            _ => Bound::Included(lower.clone()),
        };
        for entry in self.tree.range::<Vec<u8>, _>((start, Bound::Unbounded)) {
            let (k, v) = entry.map_err(|e| engine_err("scan", e))?;
            if !k.starts_with(&lower) {
                break;
            }
            let key = std::str::from_utf8(&k[strip..]).map_err(|_| CatalogError::Corrupt {
                table: table.name(),
                key: String::from_utf8_lossy(&k[strip..]).into_owned(),
                reason: "key is not utf-8".into(),
            })?;
            if !visit(key, &v)? {
                break;
            }
        }
        Ok(())
    }
}
