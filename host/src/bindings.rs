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

/// Binds a narrow world, sharing the interfaces bound for `strategy`.
macro_rules! narrow_world {
    ($(#[$doc:meta])* $module:ident, $world:tt) => {
        $(#[$doc])*
        pub mod $module {
            wasmtime::component::bindgen!({
                path: "../wit",
                world: $world,
                imports: { default: async | trappable },
                exports: { default: async },
                with: {
                    "tessera:collab/types": super::strategy::tessera::collab::types,
                    "tessera:collab/models": super::strategy::tessera::collab::models,
                    "tessera:collab/trace": super::strategy::tessera::collab::trace,
                },
            });
        }
    };
}

narrow_world!(
    /// The `router` world.
    router,
    "router"
);
narrow_world!(
    /// The `judge` world.
    judge,
    "judge"
);
narrow_world!(
    /// The `aggregator` world.
    aggregator,
    "aggregator"
);

pub use strategy::tessera::collab::{models, output, trace, training, types, weights};
