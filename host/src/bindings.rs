//! The WIT contract, bound once for the host.
//!
//! Every world shares the `types`, `models` and `trace` interfaces generated
//! for `strategy`, so one `Host` implementation serves all of them and one
//! linker links any Tessera module. Imports are async (inference waits) and
//! trappable (a policy violation ends the request).

/// The `strategy` world, and with it the shared interfaces.
pub mod strategy {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "strategy",
        imports: { default: async | trappable },
        exports: { default: async },
    });
}

/// The `router` world.
pub mod router {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "router",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "tessera:collab/types": super::strategy::tessera::collab::types,
            "tessera:collab/models": super::strategy::tessera::collab::models,
            "tessera:collab/trace": super::strategy::tessera::collab::trace,
        },
    });
}

/// The `judge` world.
pub mod judge {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "judge",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "tessera:collab/types": super::strategy::tessera::collab::types,
            "tessera:collab/models": super::strategy::tessera::collab::models,
            "tessera:collab/trace": super::strategy::tessera::collab::trace,
        },
    });
}

/// The `aggregator` world.
pub mod aggregator {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "aggregator",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "tessera:collab/types": super::strategy::tessera::collab::types,
            "tessera:collab/models": super::strategy::tessera::collab::models,
            "tessera:collab/trace": super::strategy::tessera::collab::trace,
        },
    });
}

pub use strategy::tessera::collab::{models, trace, types};
