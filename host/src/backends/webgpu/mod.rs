//! Inference on any GPU wgpu reaches (Vulkan, Metal, DX12): the edge
//! user's Apple, AMD and Intel GPUs, and software Vulkan (Mesa's llvmpipe)
//! where there is none, which is how it is tested here.
//!
//! The kernels are WGSL (`llm.wgsl`): projections by dense f32 or Q8_0
//! weights (the int8 values stay packed on the device and are scaled per
//! block of 32 inside the product), RMSNorm, rotary embeddings in both
//! layouts, causal attention over a KV cache kept on the device (online
//! softmax, grouped-query heads, an optional sliding window), the gated
//! activations and the residual adds. A forward pass is recorded into one
//! command buffer and submitted once; only the logits come back.
//!
//! Weights keep their file's format where a kernel reads it (Q8_0, f32);
//! Q4/Q5/K-quant and f16 matrices are dequantized to f32 at load, so the
//! GPU computes with exactly the values the CPU path does, save for the
//! CPU's re-encoding of Q4_1/Q5 as Q8_0, which is done here too.
//!
//! [`WgpuLlama`] runs the llama family (Llama, SmolLM2, Qwen2); Gemma 3 is
//! not ported yet.

pub mod llama;

use std::sync::{mpsc, Arc};

use wgpu::util::DeviceExt;

pub use llama::WgpuLlama;

/// How good an adapter is for compute: hardware GPUs first.
fn rank(t: wgpu::DeviceType) -> u8 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 4,
        wgpu::DeviceType::IntegratedGpu => 3,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 1,
        wgpu::DeviceType::Cpu => 0,
    }
}

/// An opened adapter: its device, queue, name and limits.
pub struct Opened {
    /// The device.
    pub device: wgpu::Device,
    /// Its queue.
    pub queue: wgpu::Queue,
    /// What it is.
    pub info: wgpu::AdapterInfo,
    /// The limits it granted (all the adapter has).
    pub limits: wgpu::Limits,
}

/// Opens the best adapter with compute shaders (hardware first), with all
/// the limits it allows. With `allow_software` false a software adapter
/// (llvmpipe) is refused. `what` names the user of the device in errors.
pub fn open_adapter(label: &str, allow_software: bool, fallback: &str) -> Result<Opened, String> {
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
        flags: wgpu::InstanceFlags::empty().with_env(),
        ..wgpu::InstanceDescriptor::new_without_display_handle()
    });
    let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
    let adapter = adapters
        .into_iter()
        .filter(|a| {
            a.get_downlevel_capabilities()
                .flags
                .contains(wgpu::DownlevelFlags::COMPUTE_SHADERS)
        })
        .max_by_key(|a| rank(a.get_info().device_type))
        .ok_or_else(|| {
            format!(
                "no GPU adapter with compute shaders was found: install a GPU driver with Vulkan, Metal or DX12 \
                 support (without a GPU, `apt-get install mesa-vulkan-drivers` gives the llvmpipe software \
                 device), or {fallback}"
            )
        })?;
    let info = adapter.get_info();
    if !allow_software && info.device_type == wgpu::DeviceType::Cpu {
        return Err(format!(
            "the only adapter is `{}`, a software device: {fallback}",
            info.name
        ));
    }
    let limits = adapter.limits();
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some(label),
        required_limits: limits.clone(),
        ..Default::default()
    }))
    .map_err(|e| format!("GPU `{}` refused a device: {e}", info.name))?;
    // Errors are caught per call with error scopes; anything that escapes
    // them is logged rather than aborting the host.
    device.on_uncaptured_error(Arc::new(|e| tracing::error!("wgpu: {e}")));
    Ok(Opened {
        device,
        queue,
        info,
        limits,
    })
}

/// Maps the first `bytes` of `staging` (a `MAP_READ` buffer whose copy
/// has been submitted), waits for the device, and returns them as f32.
pub fn read_mapped(device: &wgpu::Device, staging: &wgpu::Buffer, bytes: u64) -> Result<Vec<f32>, String> {
    let slice = staging.slice(..bytes);
    let (tx, rx) = mpsc::channel();
    slice.map_async(wgpu::MapMode::Read, move |r| {
        let _ = tx.send(r);
    });
    device
        .poll(wgpu::PollType::wait_indefinitely())
        .map_err(|e| gpu_err("waiting for the device", e))?;
    match rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(gpu_err("reading back", e)),
        Err(e) => return Err(gpu_err("reading back", e)),
    }
    let out = {
        let view = slice.get_mapped_range().map_err(|e| gpu_err("reading back", e))?;
        bytemuck::cast_slice::<u8, f32>(&view).to_vec()
    };
    staging.unmap();
    Ok(out)
}

/// A bind group layout of storage buffers for compute shaders, binding `i`
/// read-only where `read_only[i]`.
pub fn storage_layout(device: &wgpu::Device, label: &str, read_only: &[bool]) -> wgpu::BindGroupLayout {
    let entries: Vec<wgpu::BindGroupLayoutEntry> = read_only
        .iter()
        .enumerate()
        .map(|(i, &read_only)| wgpu::BindGroupLayoutEntry {
            binding: i as u32,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        })
        .collect();
    device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: Some(label),
        entries: &entries,
    })
}

/// The dispatch parameters, laid out as `Params` in llm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub n: u32,
    pub k: u32,
    pub rows: u32,
    pub pos: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub hd: u32,
    pub flags: u32,
    pub eps: f32,
    pub theta: f32,
    pub scale: f32,
    pub window: u32,
    pub col0: u32,
    pub ldo: u32,
    /// Rope and attention: the first row of the buffers they work on (a
    /// batch runs them once per sequence, each on its own rows).
    pub row0: u32,
    pub pad: u32,
}

/// The kernels of llm.wgsl on one device.
pub struct Kernels {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pub(crate) max_binding: u64,
    layout: wgpu::BindGroupLayout,
    pipelines: Vec<(&'static str, wgpu::ComputePipeline)>,
    /// A one-word buffer bound where a kernel reads nothing.
    empty: wgpu::Buffer,
}

const ENTRY_POINTS: [&str; 8] = [
    "mm_f32",
    "mm_q8",
    "add_bias",
    "add",
    "gate",
    "rmsnorm",
    "rope",
    "attention",
];

/// Why the GPU failed a call (its words, with what was being done).
pub fn gpu_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("wgpu: {what}: {e}")
}

impl Kernels {
    /// The best adapter (software allowed), with the kernels compiled.
    pub fn open() -> Result<Arc<Kernels>, String> {
        static OPENED: std::sync::Mutex<Option<Arc<Kernels>>> = std::sync::Mutex::new(None);
        let mut opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = opened.as_ref() {
            return Ok(k.clone());
        }
        let k = Arc::new(Self::new(open_adapter(
            "tessera-llm",
            true,
            "run the member on the CPU (`--device cpu`)",
        )?)?);
        *opened = Some(k.clone());
        Ok(k)
    }

    fn new(o: Opened) -> Result<Kernels, String> {
        let device = o.device;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("llm.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("llm.wgsl").into()),
        });
        let layout = storage_layout(&device, "llm", &[true, true, true, true, false]);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("llm"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipelines = ENTRY_POINTS
            .iter()
            .map(|&name| {
                let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(name),
                    layout: Some(&pipeline_layout),
                    module: &module,
                    entry_point: Some(name),
                    compilation_options: Default::default(),
                    cache: None,
                });
                (name, p)
            })
            .collect();
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err("compiling llm.wgsl", e));
        }
        let empty = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("empty"),
            size: 16,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        Ok(Kernels {
            max_binding: o.limits.max_storage_buffer_binding_size.min(o.limits.max_buffer_size),
            device,
            queue: o.queue,
            info: o.info,
            layout,
            pipelines,
            empty,
        })
    }

    /// The adapter, as a person would name it.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.device_type, self.info.backend
        )
    }

    /// A device buffer holding `data` (f32 or packed words).
    pub(crate) fn upload<T: bytemuck::Pod>(&self, label: &str, data: &[T]) -> Result<wgpu::Buffer, String> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() as u64 > self.max_binding {
            return Err(format!(
                "wgpu: `{label}` needs {} MB in one binding, more than this GPU allows ({} MB): run this member on the CPU",
                bytes.len() >> 20,
                self.max_binding >> 20
            ));
        }
        // A binding may not be empty.
        let padded;
        let contents = if bytes.is_empty() {
            padded = [0u8; 16];
            &padded[..]
        } else {
            bytes
        };
        Ok(self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
        }))
    }

    /// An uninitialised f32 device buffer of `n` values.
    pub(crate) fn scratch(&self, label: &str, n: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (n.max(4) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    /// Records one dispatch of `kernel` over `groups` workgroups.
    pub(crate) fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        kernel: &str,
        params: Params,
        inputs: [Option<&wgpu::Buffer>; 3],
        out: &wgpu::Buffer,
        groups: (u32, u32),
    ) {
        let Some((_, pipeline)) = self.pipelines.iter().find(|(n, _)| *n == kernel) else {
            tracing::error!("wgpu: no kernel `{kernel}`");
            return;
        };
        let p = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::bytes_of(&params),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let bind = |i: usize| inputs[i].unwrap_or(&self.empty).as_entire_binding();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(kernel),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: p.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: bind(0),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: bind(1),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: bind(2),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: out.as_entire_binding(),
                },
            ],
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(kernel),
            timestamp_writes: None,
        });
        pass.set_pipeline(pipeline);
        pass.set_bind_group(0, &group, &[]);
        pass.dispatch_workgroups(groups.0.max(1), groups.1.max(1), 1);
    }

    /// Workgroups of 64 covering `n` invocations, folded into two
    /// dimensions (at most 65,535 per dimension).
    pub(crate) fn flat_groups(n: usize) -> (u32, u32) {
        let groups = n.div_ceil(64);
        let x = groups.min(65_535);
        (x as u32, groups.div_ceil(65_535).max(1) as u32)
    }

    /// Submits `enc` with a copy of `src`'s first `n` floats, waits, and
    /// returns them.
    pub(crate) fn finish_and_read(
        &self,
        mut enc: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        n: usize,
    ) -> Result<Vec<f32>, String> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: (n.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, (n * 4) as u64);
        self.queue.submit([enc.finish()]);
        let mut out = read_mapped(&self.device, &staging, (n.max(1) * 4) as u64)?;
        out.truncate(n);
        Ok(out)
    }
}
