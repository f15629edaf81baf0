//! Dictionaries a receiver learned in-band: the state behind [`Codec::ZstdDict`].
//!
//! Relays keep no local state, so a relay knows only the dictionaries an agent sent on the
//! current connection ([`Dictionary`] frames, protocol version 2), on the stream it sent them
//! on (version 3's data streams each have their own). [`Dictionaries`] is that per-stream set,
//! bounded in count and size by [`DictionaryLimits`]; a batch that names an
//! id it does not hold fails with [`BatchError::UnknownDictionary`].
//!
//! [`Codec::ZstdDict`]: crate::Codec::ZstdDict

use std::collections::HashMap;
use std::fmt;

use bytes::Bytes;
use zstd::zstd_safe::DDict;

use crate::error::{BatchError, DictionaryError};
use crate::frame::Dictionary;

/// Caps on the dictionaries one connection may define.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DictionaryLimits {
    /// Most dictionaries kept per connection.
    pub max_dictionaries: u32,
    /// Largest accepted dictionary in bytes.
    pub max_dictionary_bytes: u32,
}

impl Default for DictionaryLimits {
    /// 64 dictionaries of at most 256 KiB: a dictionary per topic for many topics (agents
    /// train 32 KiB ones), at most 16 MiB plus zstd's prepared tables per connection.
    fn default() -> Self {
        DictionaryLimits {
            max_dictionaries: 64,
            max_dictionary_bytes: 256 * 1024,
        }
    }
}

/// The dictionaries received on one connection, ready for decompression.
#[derive(Default)]
pub struct Dictionaries {
    limits: DictionaryLimits,
    by_id: HashMap<u32, Entry>,
}

struct Entry {
    bytes: Bytes,
    /// Parsed once here rather than per batch.
    prepared: DDict<'static>,
}

impl fmt::Debug for Dictionaries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<u32> = self.by_id.keys().copied().collect();
        ids.sort_unstable();
        f.debug_struct("Dictionaries")
            .field("limits", &self.limits)
            .field("ids", &ids)
            .finish()
    }
}

impl Dictionaries {
    /// An empty set with these caps.
    pub fn new(limits: DictionaryLimits) -> Self {
        Dictionaries {
            limits,
            by_id: HashMap::new(),
        }
    }

    /// Keeps `dictionary` for later batches. Sending the same id again with the same bytes is
    /// harmless (a no-op); with other bytes it is [`DictionaryError::Conflict`], because
    /// batches already decoded with the first would mean something else.
    pub fn insert(&mut self, dictionary: &Dictionary) -> Result<(), DictionaryError> {
        let id = dictionary.id;
        let len = dictionary.dictionary.len();
        if len as u64 > u64::from(self.limits.max_dictionary_bytes) {
            return Err(DictionaryError::TooLarge {
                len: len as u64,
                max: self.limits.max_dictionary_bytes,
            });
        }
        if len == 0 {
            return Err(DictionaryError::Empty(id));
        }
        if let Some(known) = self.by_id.get(&id) {
            return if known.bytes == dictionary.dictionary {
                Ok(())
            } else {
                Err(DictionaryError::Conflict(id))
            };
        }
        if self.by_id.len() >= self.limits.max_dictionaries as usize {
            return Err(DictionaryError::TooMany {
                max: self.limits.max_dictionaries,
            });
        }
        // try_create: zstd refuses (null) a dictionary with its magic but broken tables; the
        // panicking constructors must never see peer bytes.
        let prepared =
            DDict::try_create(&dictionary.dictionary).ok_or_else(|| DictionaryError::Load {
                id,
                reason: "zstd refused the dictionary".to_owned(),
            })?;
        self.by_id.insert(
            id,
            Entry {
                bytes: dictionary.dictionary.clone(),
                prepared,
            },
        );
        Ok(())
    }

    /// Whether `id` was defined.
    pub fn contains(&self, id: u32) -> bool {
        self.by_id.contains_key(&id)
    }

    /// Number of dictionaries held.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// The prepared dictionary `id`, or [`BatchError::UnknownDictionary`].
    pub(crate) fn get(&self, id: u32) -> Result<&DDict<'static>, BatchError> {
        self.by_id
            .get(&id)
            .map(|entry| &entry.prepared)
            .ok_or(BatchError::UnknownDictionary(id))
    }
}
