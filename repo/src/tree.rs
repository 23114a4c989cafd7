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
    /// A regular file with holes: its data runs at their offsets, holes
    /// everywhere else up to the node's size. (A file without holes is a
    /// `File`.)
    SparseFile {
        extents: Vec<Extent>,
        hardlink: Option<u64>,
    },
    /// A block or character device node.
    Device {
        block: bool,
        rdev: u64,
    },
    /// A unix socket (restored as an unbound socket file).
    Socket,
}

/// One data run of a sparse file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extent {
    pub offset: u64,
    pub content: Vec<BlobId>,
}

impl NodeKind {
    /// Every data blob of a regular file (none for other kinds).
    pub fn data_blobs(&self) -> Box<dyn Iterator<Item = &BlobId> + '_> {
        match self {
            NodeKind::File { content, .. } => Box::new(content.iter()),
            NodeKind::SparseFile { extents, .. } => {
                Box::new(extents.iter().flat_map(|e| e.content.iter()))
            }
            _ => Box::new(std::iter::empty()),
        }
    }

    /// The data runs of a regular file as (offset, blobs): one run at 0
    /// for a dense file. `None` for other kinds.
    pub fn runs(&self) -> Option<Vec<(u64, &[BlobId])>> {
        match self {
            NodeKind::File { content, .. } => Some(vec![(0, content.as_slice())]),
            NodeKind::SparseFile { extents, .. } => Some(
                extents
                    .iter()
                    .map(|e| (e.offset, e.content.as_slice()))
                    .collect(),
            ),
            _ => None,
        }
    }

    /// The hard link group of a regular file.
    pub fn hardlink(&self) -> Option<u64> {
        match self {
            NodeKind::File { hardlink, .. } | NodeKind::SparseFile { hardlink, .. } => *hardlink,
            _ => None,
        }
    }

    pub fn is_file(&self) -> bool {
        matches!(self, NodeKind::File { .. } | NodeKind::SparseFile { .. })
    }
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
