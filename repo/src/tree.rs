//! Snapshot trees: one tree blob per directory, listing its entries sorted
//! by name. Encoded with postcard, stored as `Tree` blobs.

use serde::{Deserialize, Serialize};

use super::format::BlobId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

/// One directory entry with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Raw file name bytes (Linux names need not be UTF-8).
    pub name: Vec<u8>,
    pub kind: NodeKind,
    /// Permission and special bits (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub inode: u64,
    pub dev: u64,
    pub size: u64,
    /// Extended attributes (name, value), sorted by name.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeKind {
    /// `hardlink` is set when the file has more than one link: entries of
    /// one snapshot with the same value are links to one inode.
    File {
        content: Vec<BlobId>,
        hardlink: Option<u64>,
    },
    Dir {
        subtree: BlobId,
    },
    Symlink {
        target: Vec<u8>,
    },
    Fifo,
}

impl Node {
    /// The display form of the name (lossy for non-UTF-8 names).
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Why a name may not be restored.
pub fn unsafe_name_reason(name: &[u8]) -> Option<&'static str> {
    if name.is_empty() {
        Some("empty name")
    } else if name == b"." || name == b".." {
        Some("name is . or ..")
    } else if name.contains(&b'/') {
        Some("name contains /")
    } else if name.contains(&0) {
        Some("name contains a NUL byte")
    } else {
        None
    }
}

impl Tree {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("invariant: trees serialise")
    }

    pub fn decode(data: &[u8]) -> Result<Self, postcard::Error> {
        postcard::from_bytes(data)
    }
}
