//! One conformance suite for every [`ObjectStore`] implementation.
//!
//! Each case takes a store whose location starts empty. Implementations
//! instantiate the whole suite with [`conformance_suite!`], giving an async
//! expression that yields a [`Fixture`] (a fresh, empty location per case).

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::{ObjectInfo, ObjectKey, ObjectStore, StoreError};

/// A fresh, empty store and whatever keeps its location alive (a temporary
/// directory, a bucket).
pub struct Fixture {
    pub store: Arc<dyn ObjectStore>,
    pub _guard: Option<Box<dyn Any + Send + Sync>>,
}

/// Size of the large-object case; fixtures of stores with multipart uploads
/// set their part size well below it so several parts are exercised.
pub const LARGE_OBJECT: usize = 40 << 20;

/// Expands to one `#[tokio::test]` per conformance case, each calling
/// `$fixture` (an async expression yielding a [`Fixture`]).
#[cfg(test)]
macro_rules! conformance_suite {
    ($fixture:expr) => {
        $crate::conformance::conformance_suite!(@cases $fixture;
            put_get_roundtrip, get_range, size, list_by_prefix, list_many_keys,
            delete, not_found, overwrite, concurrent_puts, invalid_keys,
            unusual_key_characters, large_object);
    };
    (@cases $fixture:expr; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture: $crate::conformance::Fixture = $fixture.await;
                $crate::conformance::$case(&*fixture.store).await;
            }
        )*
    };
}
#[cfg(test)]
pub(crate) use conformance_suite;

fn key(s: &str) -> ObjectKey {
    ObjectKey::new(s).expect("test key is valid")
}

/// Deterministic bytes that differ at every offset of interest.
pub fn pattern(len: usize, seed: u64) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

fn sorted(mut v: Vec<ObjectInfo>) -> Vec<(String, u64)> {
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v.into_iter()
        .map(|i| (i.key.as_str().to_owned(), i.size))
        .collect()
}

pub async fn put_get_roundtrip(store: &dyn ObjectStore) {
    let cases = [
        ("empty", Bytes::new()),
        ("one", Bytes::from_static(b"x")),
        ("nested/a/b/c", pattern(1000, 1)),
        ("binary", Bytes::from((0u8..=255).collect::<Vec<_>>())),
        ("mib", pattern(1 << 20, 2)),
    ];
    for (k, data) in &cases {
        store.put(&key(k), data.clone()).await.expect("put");
    }
    for (k, data) in &cases {
        let got = store.get(&key(k)).await.expect("get");
        assert_eq!(got.len(), data.len(), "length of {k}");
        assert!(got == *data, "content of {k} differs");
    }
}

pub async fn get_range(store: &dyn ObjectStore) {
    let data = pattern(100_000, 3);
    let k = key("packs/range");
    store.put(&k, data.clone()).await.expect("put");
    for (start, end) in [
        (0, 1),
        (0, 100_000),
        (99_999, 100_000),
        (12_345, 67_890),
        (500, 500),
    ] {
        let got = store.get_range(&k, start..end).await.expect("get_range");
        assert_eq!(
            &got[..],
            &data[start as usize..end as usize],
            "range {start}..{end}"
        );
    }
    for bad in [99_000..100_001, 100_000..100_010, 200_000..200_001] {
        let err = store
            .get_range(&k, bad.clone())
            .await
            .expect_err("a range past the end is refused");
        assert!(
            matches!(err, StoreError::Permanent { .. }),
            "range {bad:?}: {err}"
        );
        assert!(err.to_string().contains("packs/range"), "{err}");
    }
}

pub async fn size(store: &dyn ObjectStore) {
    store.put(&key("s/ten"), pattern(10, 4)).await.expect("put");
    store.put(&key("s/zero"), Bytes::new()).await.expect("put");
    assert_eq!(store.size(&key("s/ten")).await.expect("size"), Some(10));
    assert_eq!(store.size(&key("s/zero")).await.expect("size"), Some(0));
    assert_eq!(store.size(&key("s/none")).await.expect("size"), None);
    // A "directory" holding objects is not an object.
    assert_eq!(store.size(&key("s")).await.expect("size"), None);
}

pub async fn list_by_prefix(store: &dyn ObjectStore) {
    let keys = [
        "config",
        "data/30/30aa",
        "data/3f/3fa2",
        "data/3f/3fbb",
        "data/40/40cc",
        "index/i1",
        "snapshots/s1",
        "snapshotsX",
    ];
    for (i, k) in keys.iter().enumerate() {
        store
            .put(&key(k), pattern(i + 1, i as u64))
            .await
            .expect("put");
    }
    let all = sorted(store.list("").await.expect("list all"));
    let expected: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| (k.to_string(), i as u64 + 1))
        .collect();
    assert_eq!(all, expected);

    let names =
        |v: Vec<ObjectInfo>| -> Vec<String> { sorted(v).into_iter().map(|(k, _)| k).collect() };
    assert_eq!(
        names(store.list("data/3").await.expect("list")),
        ["data/30/30aa", "data/3f/3fa2", "data/3f/3fbb"]
    );
    assert_eq!(
        names(store.list("data/3f/").await.expect("list")),
        ["data/3f/3fa2", "data/3f/3fbb"]
    );
    assert_eq!(
        names(store.list("snapshots/").await.expect("list")),
        ["snapshots/s1"]
    );
    assert_eq!(
        names(store.list("snapshots").await.expect("list")),
        ["snapshots/s1", "snapshotsX"]
    );
    assert!(store.list("nothing/").await.expect("list").is_empty());
    assert!(store.list("data/3f/3fa2/").await.expect("list").is_empty());
}

pub async fn list_many_keys(store: &dyn ObjectStore) {
    use futures::{StreamExt, TryStreamExt};
    // More than one page of an S3 listing (1000 keys).
    let n = 1100;
    futures::stream::iter(0..n)
        .map(|i| async move {
            store
                .put(&key(&format!("many/{i:05}")), Bytes::from(i.to_string()))
                .await
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("put many");
    store
        .put(&key("other/x"), Bytes::from_static(b"x"))
        .await
        .expect("put");
    let listed = sorted(store.list("many/").await.expect("list"));
    assert_eq!(listed.len(), n);
    for (i, (k, size)) in listed.iter().enumerate() {
        assert_eq!(k, &format!("many/{i:05}"));
        assert_eq!(*size, i.to_string().len() as u64);
    }
    assert_eq!(store.list("").await.expect("list").len(), n + 1);
}

pub async fn delete(store: &dyn ObjectStore) {
    store
        .put(&key("d/a"), Bytes::from_static(b"a"))
        .await
        .expect("put");
    store
        .put(&key("d/b"), Bytes::from_static(b"b"))
        .await
        .expect("put");
    store.delete(&key("d/a")).await.expect("delete");
    assert!(matches!(
        store.get(&key("d/a")).await,
        Err(StoreError::NotFound { .. })
    ));
    assert_eq!(store.size(&key("d/a")).await.expect("size"), None);
    assert_eq!(
        sorted(store.list("d/").await.expect("list")),
        [("d/b".to_owned(), 1)]
    );
    // Deleting what is not there is fine, twice over.
    store.delete(&key("d/a")).await.expect("delete missing");
    store
        .delete(&key("never/was"))
        .await
        .expect("delete missing");
    assert_eq!(store.get(&key("d/b")).await.expect("get"), &b"b"[..]);
}

pub async fn not_found(store: &dyn ObjectStore) {
    let k = key("missing/object");
    match store.get(&k).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, k),
        other => panic!("get of a missing object: {other:?}"),
    }
    match store.get_range(&k, 0..10).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, k),
        other => panic!("get_range of a missing object: {other:?}"),
    }
    match store.get_range(&k, 0..0).await {
        Err(StoreError::NotFound { key }) => assert_eq!(key, k),
        other => panic!("empty get_range of a missing object: {other:?}"),
    }
    let err = store.get(&k).await.expect_err("missing");
    assert_eq!(err.to_string(), "object missing/object not found");
    assert!(!err.is_transient());
}

pub async fn overwrite(store: &dyn ObjectStore) {
    let k = key("o/obj");
    store.put(&k, pattern(5000, 5)).await.expect("put");
    store.put(&k, pattern(300, 6)).await.expect("overwrite");
    assert_eq!(store.get(&k).await.expect("get"), pattern(300, 6));
    assert_eq!(store.size(&k).await.expect("size"), Some(300));
    assert_eq!(store.list("o/").await.expect("list").len(), 1);
}

pub async fn concurrent_puts(store: &dyn ObjectStore) {
    // Distinct keys in parallel, plus many writers racing on one key: the
    // survivor is one writer's whole object, never a mix.
    let distinct = (0..32u64).map(|i| async move {
        store
            .put(&key(&format!("c/k{i}")), pattern(64 * 1024, i))
            .await
    });
    let same = (0..16u64)
        .map(|i| async move { store.put(&key("c/same"), pattern(200_000, 1000 + i)).await });
    for r in futures::future::join_all(distinct).await {
        r.expect("concurrent put");
    }
    for r in futures::future::join_all(same).await {
        r.expect("concurrent put on one key");
    }
    for i in 0..32u64 {
        let got = store.get(&key(&format!("c/k{i}"))).await.expect("get");
        assert!(got == pattern(64 * 1024, i), "content of c/k{i}");
    }
    let got = store.get(&key("c/same")).await.expect("get");
    assert!(
        (0..16u64).any(|i| got == pattern(200_000, 1000 + i)),
        "c/same holds a mix of writers"
    );
    assert_eq!(store.list("c/").await.expect("list").len(), 33);
}

pub async fn invalid_keys(store: &dyn ObjectStore) {
    for bad in [
        "", "/abs", "a//b", "a/../b", "..", ".", "a/.", "a\\b", "trail/", "nul\0",
    ] {
        assert!(
            matches!(ObjectKey::new(bad), Err(StoreError::InvalidKey { .. })),
            "key {bad:?} accepted"
        );
    }
    for bad in ["../", "/", "a//", "a/../", "x\\y"] {
        let err = store
            .list(bad)
            .await
            .expect_err("a prefix that escapes is refused");
        assert!(
            matches!(err, StoreError::InvalidKey { .. }),
            "prefix {bad:?}: {err}"
        );
    }
    // Nothing was written by any of the above.
    assert!(store.list("").await.expect("list").is_empty());
}

pub async fn unusual_key_characters(store: &dyn ObjectStore) {
    let keys = [
        "sp ace/a b",
        "plus+sign",
        "percent%20",
        "q?uery#frag",
        "eq=amp&",
        "ünïcødé/日本",
        ".hidden",
        "..dots",
    ];
    for (i, k) in keys.iter().enumerate() {
        store
            .put(&key(k), pattern(10 + i, i as u64))
            .await
            .expect("put");
    }
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(
            store.get(&key(k)).await.expect("get"),
            pattern(10 + i, i as u64),
            "{k}"
        );
    }
    let listed: BTreeMap<_, _> = sorted(store.list("").await.expect("list"))
        .into_iter()
        .collect();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(listed.get(*k), Some(&(10 + i as u64)), "{k} listed");
    }
    assert_eq!(listed.len(), keys.len());
}

pub async fn large_object(store: &dyn ObjectStore) {
    let data = pattern(LARGE_OBJECT + 12_345, 7);
    let k = key("large/pack");
    store.put(&k, data.clone()).await.expect("put large");
    assert_eq!(store.size(&k).await.expect("size"), Some(data.len() as u64));
    let got = store.get(&k).await.expect("get large");
    assert!(got == data, "large object content differs");
    // Ranges across what are part boundaries for a 5 MiB part size.
    let mib5 = 5u64 << 20;
    for r in [
        mib5 - 10..mib5 + 10,
        3 * mib5 - 1..3 * mib5 + 1,
        0..2 * mib5 + 7,
    ] {
        let got = store.get_range(&k, r.clone()).await.expect("range");
        assert_eq!(&got[..], &data[r.start as usize..r.end as usize], "{r:?}");
    }
    assert_eq!(
        sorted(store.list("large/").await.expect("list")),
        [("large/pack".to_owned(), data.len() as u64)]
    );
}
