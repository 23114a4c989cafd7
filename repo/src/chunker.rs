//! Content-defined chunking: FastCDC (2020 variant, normalisation level 1)
//! with a gear table seeded from the repository key, so chunk boundaries
//! depend on the key as well as on the content.

use std::io::Read;

use fastcdc::v2020::{MASKS, cut_gear, get_gear_with_seed, logarithm2};

use super::format::ChunkerParams;

/// Finds chunk boundaries. Cheap to clone.
#[derive(Clone)]
pub struct Chunker {
    gear: Box<[u64; 256]>,
    gear_ls: Box<[u64; 256]>,
    mask_s: u64,
    mask_l: u64,
    params: ChunkerParams,
}

impl std::fmt::Debug for Chunker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Chunker")
            .field("params", &self.params)
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "chunker parameters {min}/{avg}/{max} are out of range (64 B ≤ min ≤ 1 MiB, 256 B ≤ avg ≤ 4 MiB, 1 KiB ≤ max ≤ 16 MiB, min ≤ avg ≤ max)"
)]
pub struct BadChunkerParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

impl Chunker {
    pub fn new(params: ChunkerParams, seed: u64) -> Result<Self, BadChunkerParams> {
        use fastcdc::v2020::{
            AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MAXIMUM_MIN, MINIMUM_MAX, MINIMUM_MIN,
        };
        let ChunkerParams {
            min_size: min,
            avg_size: avg,
            max_size: max,
        } = params;
        let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
            && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
            && (MAXIMUM_MIN..=MAXIMUM_MAX).contains(&max)
            && min <= avg
            && avg <= max;
        if !ok {
            return Err(BadChunkerParams { min, avg, max });
        }
        let bits = logarithm2(avg);
        let (gear, gear_ls) = get_gear_with_seed(seed);
        Ok(Self {
            gear,
            gear_ls,
            mask_s: MASKS[(bits + 1) as usize],
            mask_l: MASKS[(bits - 1) as usize],
            params,
        })
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// The length of the first chunk of `data`, assuming `data` either
    /// holds at least `max_size` bytes or ends at the end of the stream.
    pub fn cut(&self, data: &[u8]) -> usize {
        let (_, len) = cut_gear(
            data,
            self.params.min_size as usize,
            self.params.avg_size as usize,
            self.params.max_size as usize,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
            &self.gear,
            &self.gear_ls,
        );
        len
    }

    /// Splits a stream of `len` bytes (a hint: the stream may end earlier)
    /// into chunks, calling `emit` for each one in order. Reads in blocks of
    /// up to `2 × max_size`, or the whole stream when it is smaller; memory
    /// use is bounded by that buffer.
    pub fn chunk_reader<R: Read, E>(
        &self,
        mut reader: R,
        len: u64,
        buf: &mut Vec<u8>,
        mut emit: impl FnMut(&[u8]) -> Result<(), E>,
        map_io: impl Fn(std::io::Error) -> E,
    ) -> Result<u64, E> {
        let max = self.params.max_size as usize;
        let want = (2 * max)
            .max(4 << 20)
            .min(len.saturating_add(1).max(4096) as usize);
        if buf.len() < want {
            buf.resize(want, 0);
        }
        let cap = buf.len();
        let mut start = 0usize;
        let mut end = 0usize;
        let mut eof = false;
        let mut total = 0u64;
        loop {
            // Refill until we hold at least max bytes or hit the end.
            if !eof && end - start < max {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                while end < cap {
                    match reader.read(&mut buf[end..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => end += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(map_io(e)),
                    }
                }
            }
            if start == end {
                return Ok(total);
            }
            let len = self.cut(&buf[start..end]);
            emit(&buf[start..start + len])?;
            total += len as u64;
            start += len;
        }
    }
}

/// Whether `data` is all zero bytes (compared in blocks against a zero
/// page, which the compiler vectorises).
pub fn is_zero(data: &[u8]) -> bool {
    static ZEROS: [u8; 4096] = [0; 4096];
    data.chunks(ZEROS.len()).all(|c| c == &ZEROS[..c.len()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn small() -> ChunkerParams {
        ChunkerParams {
            min_size: 2048,
            avg_size: 8192,
            max_size: 65536,
        }
    }

    fn chunks(c: &Chunker, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        c.chunk_reader::<_, std::io::Error>(
            data,
            data.len() as u64,
            &mut Vec::new(),
            |ch| {
                out.push(ch.to_vec());
                Ok(())
            },
            |e| e,
        )
        .expect("chunk");
        out
    }

    #[test]
    fn chunks_cover_input_within_bounds_and_resync_after_insert() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut data = vec![0u8; 1 << 20];
        rng.fill(&mut data[..]);
        let c = Chunker::new(small(), 42).expect("params");
        let a = chunks(&c, &data);
        assert_eq!(a.concat(), data);
        for ch in &a[..a.len() - 1] {
            assert!(
                ch.len() >= 2048 && ch.len() <= 65536,
                "chunk of {}",
                ch.len()
            );
        }
        // Insert a few bytes near the start: most later chunks stay equal.
        let mut data2 = data.clone();
        data2.splice(1000..1000, [1, 2, 3, 4, 5]);
        let b = chunks(&c, &data2);
        let same = b.iter().filter(|ch| a.contains(ch)).count();
        assert!(
            same + 3 >= a.len(),
            "only {same} of {} chunks survived",
            a.len()
        );
        // Another seed cuts elsewhere.
        let c2 = Chunker::new(small(), 43).expect("params");
        assert_ne!(chunks(&c2, &data), a);
    }

    #[test]
    fn rejects_bad_params() {
        let p = ChunkerParams {
            min_size: 10,
            avg_size: 8,
            max_size: 4,
        };
        assert!(Chunker::new(p, 0).is_err());
    }
}
