//! Hostile test module: deep-recursion. Recurses without end. Two flavours,
//! chosen by config `mode`, because a wasm guest has two stacks:
//! - `shadow` (default): each level keeps an address-taken value, so frames
//!   live on the guest's own stack in linear memory, which runs off the
//!   bottom of memory;
//! - `wasm`: plain recursion whose frames live only on the engine's wasm
//!   stack, which hits the host's `max_wasm_stack`.

use tessera_sdk::*;

struct Hostile;

/// Calls the next level through an opaque function pointer (kept on the
/// shadow stack), so it can be neither inlined nor turned into a loop.
fn shadow(n: u64) -> u64 {
    let next = std::hint::black_box(shadow as fn(u64) -> u64);
    next(n + 1).wrapping_mul(31).wrapping_add(n)
}

/// Only wasm locals; the multiply-add after the call keeps it from being a
/// tail call.
#[inline(never)]
fn plain(n: u64) -> u64 {
    if n == u64::MAX {
        return 0;
    }
    plain(n + 1).wrapping_mul(31).wrapping_add(n)
}

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let mode = Config::from_pairs(req.config)
            .get("mode")
            .unwrap_or("shadow")
            .to_string();
        let start = std::hint::black_box(0);
        let v = if mode == "wasm" { plain(start) } else { shadow(start) };
        Ok(Response {
            text: v.to_string(),
            annotations: vec![],
        })
    }
}

export_strategy!(Hostile);
