//! A member's prefix cache: the keys and values of prompts already run,
//! shared across requests, so that a prefix several prompts have in common
//! (a system prompt, a few-shot block, the question that every strategy,
//! debate round or option of an item repeats) is computed once.
//!
//! The design is vLLM's automatic prefix caching, written for Tessera: a
//! prompt's cache is cut into blocks of [`BLOCK`] tokens, and each block is
//! filed under a hash of its own tokens chained with its parent's hash, so a
//! block stands for exactly one whole prefix. A lookup walks the prompt's
//! blocks from the start while they are present; an insert files the blocks
//! a prompt has that the cache lacks. Prompts that share a beginning share
//! its blocks in memory. A hash is only an index: a block also keeps its
//! tokens and its parent's hash, and a lookup compares both, so a collision
//! cannot hand one prompt another's keys. The hasher is keyed at random per
//! cache (std's SipHash), so a caller cannot aim collisions either.
//!
//! Memory is bounded by a byte budget; past it the least recently used
//! block goes first. A lookup or insert touches a prompt's blocks from the
//! last to the first, so a parent is always more recent than its children
//! and eviction removes a chain from its end: no block is left that a lookup
//! can no longer reach.
//!
//! Exactness: a block holds the keys and values the prompt's own prefill
//! computed, and keys and values at a position depend only on the tokens up
//! to it. The rest of a prompt is then run in the pieces and on the kernels
//! its prefill would have used without the cache (see
//! [`super::GgufModel`]'s prefill), so the logits are the same to the bit
//! (tested on every member of the default pool). A prompt always runs at
//! least its last token, whose logits the caller needs.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use super::llama::{KvState, LayerKv};

/// Tokens per block: small enough that a chat template's system prompt of a
/// few dozen tokens is reused, large enough that rebuilding a 500-token
/// prefix joins only about 30 pieces per layer.
pub const BLOCK: usize = 16;

/// What a member's prefix cache has done since the member loaded, shared
/// with the pool (the server's `/metrics` reads it while the member's
/// worker writes it).
#[derive(Debug, Default)]
pub struct PrefixStats {
    lookups: AtomicU64,
    hits: AtomicU64,
    prompt_tokens: AtomicU64,
    reused_tokens: AtomicU64,
    inserted_blocks: AtomicU64,
    evicted_blocks: AtomicU64,
    blocks: AtomicU64,
    bytes: AtomicU64,
    budget: AtomicU64,
}

/// A reading of [`PrefixStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefixSnapshot {
    /// Prompts looked up.
    pub lookups: u64,
    /// Lookups that reused at least one block.
    pub hits: u64,
    /// Tokens of the prompts looked up.
    pub prompt_tokens: u64,
    /// Of those, tokens whose keys and values came from the cache.
    pub reused_tokens: u64,
    /// Blocks filed.
    pub inserted_blocks: u64,
    /// Blocks evicted to stay within the budget.
    pub evicted_blocks: u64,
    /// Blocks held now.
    pub blocks: u64,
    /// Bytes held now.
    pub bytes: u64,
    /// The byte budget.
    pub budget: u64,
}

impl PrefixStats {
    /// The counters now.
    pub fn snapshot(&self) -> PrefixSnapshot {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        PrefixSnapshot {
            lookups: get(&self.lookups),
            hits: get(&self.hits),
            prompt_tokens: get(&self.prompt_tokens),
            reused_tokens: get(&self.reused_tokens),
            inserted_blocks: get(&self.inserted_blocks),
            evicted_blocks: get(&self.evicted_blocks),
            blocks: get(&self.blocks),
            bytes: get(&self.bytes),
            budget: get(&self.budget),
        }
    }
}

struct Block {
    /// The hash of the block before it (0 for a prompt's first block).
    parent: u64,
    tokens: Vec<u32>,
    /// Per layer, keys and values of the block's positions (`[1, kv_heads,
    /// BLOCK, head_dim]` each), held in their own storage.
    kv: Vec<(Tensor, Tensor)>,
    bytes: usize,
    /// When it was last used (larger is more recent).
    stamp: u64,
}

/// One member's cache (see the module docs). Owned by the member's model,
/// so it needs no lock.
pub struct PrefixCache {
    budget: usize,
    used: usize,
    clock: u64,
    hasher: std::collections::hash_map::RandomState,
    blocks: HashMap<u64, Block>,
    stats: Arc<PrefixStats>,
}

/// A prefix found in the cache: how many tokens, and their keys and values
/// per layer, ready to be put into the model.
pub struct Found {
    /// Tokens reused.
    pub tokens: usize,
    /// The keys and values of those tokens.
    pub state: KvState,
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes (0: nothing is kept).
    pub fn new(budget: usize) -> Self {
        let stats = Arc::new(PrefixStats::default());
        stats.budget.store(budget as u64, Ordering::Relaxed);
        PrefixCache {
            budget,
            used: 0,
            clock: 0,
            hasher: Default::default(),
            blocks: HashMap::new(),
            stats,
        }
    }

    /// The counters the pool and the server read.
    pub fn stats(&self) -> Arc<PrefixStats> {
        self.stats.clone()
    }

    /// Whether the cache keeps anything at all.
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    /// Drops every block and sets a new budget.
    pub fn reset(&mut self, budget: usize) {
        self.blocks.clear();
        self.used = 0;
        self.budget = budget;
        self.stats.budget.store(budget as u64, Ordering::Relaxed);
        self.publish();
    }

    fn chain(&self, parent: u64, tokens: &[u32]) -> u64 {
        let mut h = self.hasher.build_hasher();
        parent.hash(&mut h);
        tokens.hash(&mut h);
        // 0 marks "no parent"; a real hash of 0 is moved off it.
        h.finish().max(1)
    }

    /// The hashes of `ids`' leading full blocks that are in the cache, in
    /// order (verified against each block's tokens and parent), up to
    /// `max_blocks`.
    fn path(&self, ids: &[u32], max_blocks: usize) -> Vec<u64> {
        let mut path = Vec::new();
        let mut parent = 0;
        for tokens in ids.chunks_exact(BLOCK).take(max_blocks) {
            let h = self.chain(parent, tokens);
            match self.blocks.get(&h) {
                Some(b) if b.parent == parent && b.tokens == tokens => path.push(h),
                _ => break,
            }
            parent = h;
        }
        path
    }

    /// Marks `path`'s blocks used, the last first, so that a parent always
    /// ends more recent than its children.
    fn touch(&mut self, path: &[u64]) {
        for h in path.iter().rev() {
            self.clock += 1;
            if let Some(b) = self.blocks.get_mut(h) {
                b.stamp = self.clock;
            }
        }
    }

    /// The longest cached prefix of `ids` that leaves at least its last
    /// token to run, with its keys and values joined per layer; `None` when
    /// not one block matches.
    pub fn lookup(&mut self, ids: &[u32]) -> Result<Option<Found>> {
        if !self.enabled() {
            return Ok(None);
        }
        self.stats.lookups.fetch_add(1, Ordering::Relaxed);
        self.stats.prompt_tokens.fetch_add(ids.len() as u64, Ordering::Relaxed);
        let path = self.path(ids, ids.len().saturating_sub(1) / BLOCK);
        if path.is_empty() {
            return Ok(None);
        }
        self.touch(&path);
        let layers = self.blocks.get(&path[0]).map(|b| b.kv.len()).unwrap_or(0);
        let mut state = KvState::with_capacity(layers);
        for layer in 0..layers {
            let (mut ks, mut vs) = (Vec::with_capacity(path.len()), Vec::with_capacity(path.len()));
            for h in &path {
                if let Some((k, v)) = self.blocks.get(h).and_then(|b| b.kv.get(layer)) {
                    ks.push(k);
                    vs.push(v);
                }
            }
            state.push(Some(LayerKv::new(Tensor::cat(&ks, 2)?, Tensor::cat(&vs, 2)?)?));
        }
        let tokens = path.len() * BLOCK;
        self.stats.hits.fetch_add(1, Ordering::Relaxed);
        self.stats.reused_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
        Ok(Some(Found { tokens, state }))
    }

    /// Files the full blocks of `ids` that the cache lacks, cut from
    /// `state` (the model's cache after running `ids`; it may hold more
    /// positions than that), evicting the least recently used blocks to
    /// stay within the budget. A block that cannot fit without evicting
    /// this prompt's own earlier blocks is not filed, nor are the ones
    /// after it.
    ///
    /// A failure (a tensor operation on `state`) leaves the cache whole:
    /// each block is built before it is filed, so the cache holds what it
    /// held plus the blocks filed before the failure, and its counters say
    /// so.
    pub fn insert(&mut self, ids: &[u32], state: &KvState) -> Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let filed = self.file_blocks(ids, state);
        self.publish();
        filed
    }

    fn file_blocks(&mut self, ids: &[u32], state: &KvState) -> Result<()> {
        let present = self.path(ids, usize::MAX);
        let mut path = present.clone();
        let mut parent = present.last().copied().unwrap_or(0);
        // This prompt's blocks are marked newest, so eviction below takes
        // other prompts' blocks before them and never its own.
        let keep_from = self.clock + 1;
        self.touch(&present);
        for (i, tokens) in ids.chunks_exact(BLOCK).enumerate().skip(present.len()) {
            let mut kv = Vec::with_capacity(state.len());
            let mut bytes = 0;
            for layer in state {
                let Some(layer) = layer else {
                    return Ok(());
                };
                if layer.len() < (i + 1) * BLOCK {
                    return Ok(());
                }
                let (k, v) = (layer.keys()?, layer.values()?);
                // A copy, not a view: a view would keep the prompt's whole
                // cache alive for the sake of one block.
                let k = k.narrow(2, i * BLOCK, BLOCK)?.force_contiguous()?;
                let v = v.narrow(2, i * BLOCK, BLOCK)?.force_contiguous()?;
                bytes += (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes();
                kv.push((k, v));
            }
            if !self.make_room(bytes, keep_from) {
                break;
            }
            let h = self.chain(parent, tokens);
            self.clock += 1;
            self.blocks.insert(
                h,
                Block {
                    parent,
                    tokens: tokens.to_vec(),
                    kv,
                    bytes,
                    stamp: self.clock,
                },
            );
            self.used += bytes;
            self.stats.inserted_blocks.fetch_add(1, Ordering::Relaxed);
            path.push(h);
            parent = h;
        }
        self.touch(&path);
        Ok(())
    }

    /// Evicts least recently used blocks until `bytes` more fit, never one
    /// marked at or after `keep_from`; `false` if that is not enough.
    fn make_room(&mut self, bytes: usize, keep_from: u64) -> bool {
        while self.used + bytes > self.budget {
            let oldest = self
                .blocks
                .iter()
                .filter(|(_, b)| b.stamp < keep_from)
                .min_by_key(|(_, b)| b.stamp)
                .map(|(h, _)| *h);
            let Some(h) = oldest else {
                return false;
            };
            if let Some(b) = self.blocks.remove(&h) {
                self.used -= b.bytes;
                self.stats.evicted_blocks.fetch_add(1, Ordering::Relaxed);
            }
        }
        true
    }

    fn publish(&self) {
        self.stats.blocks.store(self.blocks.len() as u64, Ordering::Relaxed);
        self.stats.bytes.store(self.used as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A fake model cache for `n` positions of 2 layers, value = position.
    fn state(n: usize) -> KvState {
        let pos: Vec<f32> = (0..n).map(|p| p as f32).collect();
        let t = Tensor::from_vec(pos, (1, 1, n, 1), &Device::Cpu).expect("tensor");
        let t = t
            .broadcast_as((1, 2, n, 4))
            .expect("broadcast")
            .contiguous()
            .expect("contiguous");
        vec![
            Some(LayerKv::new(t.clone(), t.clone()).expect("layer")),
            Some(LayerKv::new(t.clone(), (t * 2.0).expect("scale")).expect("layer")),
        ]
    }

    fn positions(state: &KvState) -> Vec<f32> {
        let k = state[0].as_ref().expect("layer").keys().expect("keys");
        k.narrow(1, 0, 1)
            .and_then(|t| t.narrow(3, 0, 1))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_vec1())
            .expect("values")
    }

    fn block_bytes() -> usize {
        2 * 2 * (2 * BLOCK * 4) * 4
    }

    #[test]
    fn a_shared_beginning_is_found_and_the_last_token_always_runs() {
        let mut c = PrefixCache::new(1 << 20);
        let a: Vec<u32> = (0..40).collect();
        c.insert(&a, &state(40)).expect("insert");
        assert_eq!(c.stats().snapshot().blocks, 2);
        // Same first 35 tokens: two blocks reused.
        let mut b: Vec<u32> = (0..35).collect();
        b.extend([900, 901]);
        let found = c.lookup(&b).expect("lookup").expect("hit");
        assert_eq!(found.tokens, 32);
        assert_eq!(positions(&found.state), (0..32).map(|p| p as f32).collect::<Vec<_>>());
        // Exactly 32 tokens: only one block, so the last token still runs.
        let found = c.lookup(&a[..32]).expect("lookup").expect("hit");
        assert_eq!(found.tokens, 16);
        // A different first token shares nothing.
        let mut d = a.clone();
        d[0] = 7;
        assert!(c.lookup(&d).expect("lookup").is_none());
        let s = c.stats().snapshot();
        assert_eq!((s.lookups, s.hits, s.reused_tokens), (3, 2, 48));
    }

    #[test]
    fn shared_blocks_are_stored_once() {
        let mut c = PrefixCache::new(1 << 20);
        let a: Vec<u32> = (0..48).collect();
        let mut b: Vec<u32> = (0..32).collect();
        b.extend(100..116);
        c.insert(&a, &state(48)).expect("insert");
        c.insert(&b, &state(48)).expect("insert");
        let s = c.stats().snapshot();
        assert_eq!(s.blocks, 4, "two shared blocks, one of each tail");
        assert_eq!(s.bytes, 4 * block_bytes() as u64);
    }

    #[test]
    fn the_budget_holds_and_the_least_recent_prompt_goes_first() {
        // Room for three blocks.
        let mut c = PrefixCache::new(3 * block_bytes());
        let a: Vec<u32> = (0..32).collect();
        let b: Vec<u32> = (1000..1032).collect();
        c.insert(&a, &state(32)).expect("insert");
        c.insert(&b, &state(32)).expect("insert");
        let s = c.stats().snapshot();
        assert!(s.bytes <= s.budget);
        assert_eq!(s.blocks, 3);
        assert_eq!(s.evicted_blocks, 1);
        // `a`'s second block went (a chain loses its end first); its first
        // block still serves, and `b` is whole.
        let probe: Vec<u32> = (0..33).collect();
        assert_eq!(c.lookup(&probe).expect("lookup").map(|f| f.tokens), Some(16));
        let probe: Vec<u32> = (1000..1033).collect();
        assert_eq!(c.lookup(&probe).expect("lookup").map(|f| f.tokens), Some(32));
    }

    #[test]
    fn a_prompt_larger_than_the_budget_keeps_what_fits() {
        let mut c = PrefixCache::new(2 * block_bytes());
        let a: Vec<u32> = (0..80).collect();
        c.insert(&a, &state(80)).expect("insert");
        let s = c.stats().snapshot();
        assert_eq!((s.blocks, s.evicted_blocks), (2, 0));
        assert_eq!(c.lookup(&a).expect("lookup").map(|f| f.tokens), Some(32));
    }

    #[test]
    fn no_budget_keeps_nothing() {
        let mut c = PrefixCache::new(0);
        let a: Vec<u32> = (0..40).collect();
        c.insert(&a, &state(40)).expect("insert");
        assert!(c.lookup(&a).expect("lookup").is_none());
        assert_eq!(c.stats().snapshot(), PrefixSnapshot::default());
    }
}
