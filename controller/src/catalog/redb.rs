//! The redb engine: one file, one write transaction at a time, every commit
//! durable (redb's default `Durability::Immediate`).

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::CatalogError;
use super::store::{Kv, KvTxn, Table, Visit};

fn def(table: Table) -> TableDefinition<'static, &'static str, &'static [u8]> {
    TableDefinition::new(table.name())
}

/// Maps a redb error: corruption is permanent, everything else (I/O) is
/// reported as transient.
fn engine_err(op: &'static str, err: impl Into<redb::Error>) -> CatalogError {
    match err.into() {
        redb::Error::Corrupted(reason) => CatalogError::Damaged { op, reason },
        other => CatalogError::Storage {
            op,
            source: Box::new(other),
        },
    }
}

pub(crate) struct RedbKv {
    db: Database,
    path: PathBuf,
}

impl RedbKv {
    /// Opens or creates the database file. Blocking.
    pub(crate) fn open(path: &Path) -> Result<super::store::KvCatalog<Self>, CatalogError> {
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => CatalogError::InUse {
                path: path.to_path_buf(),
            },
            other => engine_err("open", other),
        })?;
        let txn = db.begin_write().map_err(|e| engine_err("open", e))?;
        for table in Table::ALL {
            txn.open_table(def(table))
                .map_err(|e| engine_err("open", e))?;
        }
        txn.commit().map_err(|e| engine_err("open", e))?;
        let kv = Self {
            db,
            path: path.to_path_buf(),
        };
        tracing::debug!(path = %kv.path.display(), "opened redb catalog");
        super::store::KvCatalog::init(kv, path)
    }
}

struct RedbTxn<'a> {
    txn: &'a redb::WriteTransaction,
    op: &'static str,
}

impl KvTxn for RedbTxn<'_> {
    fn get(&mut self, table: Table, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let t = self
            .txn
            .open_table(def(table))
            .map_err(|e| engine_err(self.op, e))?;
        let v = t.get(key).map_err(|e| engine_err(self.op, e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn put(&mut self, table: Table, key: &str, value: &[u8]) -> Result<(), CatalogError> {
        let mut t = self
            .txn
            .open_table(def(table))
            .map_err(|e| engine_err(self.op, e))?;
        t.insert(key, value).map_err(|e| engine_err(self.op, e))?;
        Ok(())
    }

    fn remove(&mut self, table: Table, key: &str) -> Result<bool, CatalogError> {
        let mut t = self
            .txn
            .open_table(def(table))
            .map_err(|e| engine_err(self.op, e))?;
        let old = t.remove(key).map_err(|e| engine_err(self.op, e))?;
        Ok(old.is_some())
    }
}

impl Kv for RedbKv {
    fn write<T>(
        &self,
        op: &'static str,
        f: &dyn Fn(&mut dyn KvTxn) -> Result<T, CatalogError>,
    ) -> Result<T, CatalogError> {
        let txn = self.db.begin_write().map_err(|e| engine_err(op, e))?;
        let result = f(&mut RedbTxn { txn: &txn, op });
        match result {
            Ok(value) => {
                txn.commit().map_err(|e| engine_err(op, e))?;
                Ok(value)
            }
            Err(e) => {
                txn.abort().map_err(|abort| engine_err(op, abort))?;
                Err(e)
            }
        }
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, CatalogError> {
        let op = "read";
        let txn = self.db.begin_read().map_err(|e| engine_err(op, e))?;
        let t = txn.open_table(def(table)).map_err(|e| engine_err(op, e))?;
        let v = t.get(key).map_err(|e| engine_err(op, e))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    fn scan_from(
        &self,
        table: Table,
        prefix: &str,
        after: Option<&str>,
        visit: &mut Visit<'_>,
    ) -> Result<(), CatalogError> {
        use std::ops::Bound;
        let op = "scan";
        let txn = self.db.begin_read().map_err(|e| engine_err(op, e))?;
        let t = txn.open_table(def(table)).map_err(|e| engine_err(op, e))?;
        let start = match after {
            Some(a) if a >= prefix => Bound::Excluded(a),
            _ => Bound::Included(prefix),
        };
        let range: (Bound<&str>, Bound<&str>) = (start, Bound::Unbounded);
        for entry in t.range::<&str>(range).map_err(|e| engine_err(op, e))? {
            let (k, v) = entry.map_err(|e| engine_err(op, e))?;
            let key = k.value();
            if !key.starts_with(prefix) || !visit(key, v.value())? {
                break;
            }
        }
        Ok(())
    }
}
