//! Merging on a GPU through wgpu compute shaders.
//!
//! [`Gpu`] runs the two merge primitives of [`super::methods`] as WGSL
//! kernels (`merge.wgsl`) on whatever adapter wgpu finds: a discrete or
//! integrated GPU through Vulkan, Metal or DX12, or a software Vulkan
//! device such as Mesa's llvmpipe (`apt-get install mesa-vulkan-drivers`),
//! which is how the kernels are tested on machines without a GPU.
//!
//! Tensors stream through in chunks: one chunk of the base and of every
//! model is uploaded, combined, and read back before the next, so device
//! memory holds a few tens of MB however large the tensor (an embedding
//! matrix of a 0.5B model is 540 MB in f32, more than many devices let one
//! binding address). Arithmetic is `f32` where the CPU path accumulates in
//! `f64`, so results agree to floating-point tolerance rather than bit for
//! bit; which entries TIES and DARE keep is decided identically (the same
//! threshold, the same integer hash), so the two never disagree on a mask.

use std::sync::Mutex;

use wgpu::util::DeviceExt;

use super::methods::{mix32, Combine, Keep};
use super::MergeError;

/// Threads per workgroup in `merge.wgsl`.
const GROUP: usize = 256;
/// Largest chunk per input tensor, in floats (16 MB).
const MAX_CHUNK: usize = 1 << 22;

/// The merge kernels on one wgpu device.
pub struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    layout: wgpu::BindGroupLayout,
    combine: wgpu::ComputePipeline,
    dots: wgpu::ComputePipeline,
    info: wgpu::AdapterInfo,
    max_binding: u64,
    /// One merge on the device at a time keeps its memory bounded.
    busy: Mutex<()>,
}

// `Header` and `Rule` are the byte layout of the structs of the same names
// in merge.wgsl: field for field, 32-bit each, in the same order.

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Header {
    n: u32,
    models: u32,
    offset: u32,
    flags: u32,
    lambda: f32,
    stride: u32,
    pad: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Rule {
    weight: f32,
    kind: u32,
    threshold: f32,
    ties_until: u32,
    key_lo: u32,
    key_hi: u32,
    density: f32,
    scale: f32,
}

impl Rule {
    fn new(weight: f64, keep: Keep) -> Rule {
        let mut r = Rule {
            weight: weight as f32,
            kind: 0,
            threshold: 0.0,
            ties_until: 0,
            key_lo: 0,
            key_hi: 0,
            density: 1.0,
            scale: 1.0,
        };
        match keep {
            Keep::All => {}
            Keep::Magnitude { threshold, ties_until } => {
                r.kind = 1;
                r.threshold = threshold;
                r.ties_until = ties_until;
            }
            Keep::Random { seed, density } => {
                r.kind = 2;
                r.key_lo = mix32(seed as u32);
                r.key_hi = (seed >> 32) as u32;
                r.density = density;
                r.scale = 1.0 / density;
            }
        }
        r
    }
}

fn gpu_err(what: &str, e: impl std::fmt::Display) -> MergeError {
    MergeError::Io(format!("GPU merge: {what}: {e}"))
}

impl Gpu {
    /// Opens the best adapter wgpu finds. With `allow_software` false, a
    /// software adapter (llvmpipe and the like) is refused, so that `auto`
    /// only moves merges off the CPU when a real GPU is there.
    pub fn open(allow_software: bool) -> Result<Gpu, String> {
        let opened = crate::backends::webgpu::open_adapter(
            "tessera-merge",
            allow_software,
            "merge on the CPU with `--merge-device cpu` (faster than a software device)",
        )?;
        let (device, queue, info, limits) = (opened.device, opened.queue, opened.info, opened.limits);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some("merge.wgsl"),
            source: wgpu::ShaderSource::Wgsl(include_str!("merge.wgsl").into()),
        });
        let layout = crate::backends::webgpu::storage_layout(&device, "merge", &[true, true, true, false]);
        let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("merge"),
            bind_group_layouts: &[Some(&layout)],
            immediate_size: 0,
        });
        let pipeline = |entry_point: &str| {
            device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry_point),
                layout: Some(&pipeline_layout),
                module: &module,
                entry_point: Some(entry_point),
                compilation_options: Default::default(),
                cache: None,
            })
        };
        let (combine, dots) = (pipeline("combine"), pipeline("dots"));
        Ok(Gpu {
            max_binding: limits.max_storage_buffer_binding_size.min(limits.max_buffer_size),
            device,
            queue,
            layout,
            combine,
            dots,
            info,
            busy: Mutex::new(()),
        })
    }

    /// The adapter, as a person would name it.
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.device_type, self.info.backend
        )
    }

    /// Whether the adapter is a software rasteriser on the CPU.
    pub fn is_software(&self) -> bool {
        self.info.device_type == wgpu::DeviceType::Cpu
    }

    /// The chunk length for `arrays` inputs: bounded by what one binding
    /// may address and a multiple of the workgroup size.
    fn chunk(&self, arrays: usize, n: usize) -> usize {
        let fit = (self.max_binding as usize / 4 / arrays.max(1)).min(MAX_CHUNK);
        let c = n.min(fit).max(1);
        c.div_ceil(GROUP) * GROUP
    }

    /// Runs `entry` over `inputs` (each `n` long) in chunks; `each` gets
    /// every chunk's offset and the output buffer's first `read` floats.
    fn run(
        &self,
        pipeline: &wgpu::ComputePipeline,
        inputs: &[&[f32]],
        rules: &[Rule],
        mut header: Header,
        read: impl Fn(usize) -> usize,
        mut each: impl FnMut(usize, &[f32]),
    ) -> Result<(), MergeError> {
        let _busy = self
            .busy
            .lock()
            .map_err(|_| gpu_err("device", "a previous merge panicked"))?;
        let n = inputs.first().map_or(0, |x| x.len());
        if n > u32::MAX as usize {
            return Err(gpu_err("tensor", format!("{n} values is more than 2^32")));
        }
        let chunk = self.chunk(inputs.len(), n);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST;
        let data = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("inputs"),
            size: (chunk * inputs.len() * 4) as u64,
            usage: storage,
            mapped_at_creation: false,
        });
        let out = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("out"),
            size: (chunk * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size: (chunk * 4) as u64,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let head = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("header"),
            size: std::mem::size_of::<Header>() as u64,
            usage: storage,
            mapped_at_creation: false,
        });
        // A binding may not be empty: a placeholder rule when none are used.
        let placeholder = [Rule::new(0.0, Keep::All)];
        let rules_buf = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("rules"),
            contents: bytemuck::cast_slice(if rules.is_empty() { &placeholder } else { rules }),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("merge"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: head.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: rules_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: data.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: out.as_entire_binding(),
                },
            ],
        });
        if let Some(e) = pollster::block_on(memory.pop()) {
            return Err(gpu_err(
                &format!("{} MB of buffers", (chunk * (inputs.len() + 2) * 4) >> 20),
                e,
            ));
        }
        header.stride = chunk as u32;
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            for (a, x) in inputs.iter().enumerate() {
                self.queue.write_buffer(
                    &data,
                    (a * chunk * 4) as u64,
                    bytemuck::cast_slice(&x[start..start + len]),
                );
            }
            header.n = len as u32;
            header.offset = start as u32;
            self.queue.write_buffer(&head, 0, bytemuck::bytes_of(&header));
            let groups = len.div_ceil(GROUP);
            let want = read(len);
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(groups as u32, 1, 1);
            }
            enc.copy_buffer_to_buffer(&out, 0, &staging, 0, (want * 4) as u64);
            self.queue.submit([enc.finish()]);
            let values = crate::backends::webgpu::read_mapped(&self.device, &staging, (want * 4) as u64)
                .map_err(|e| MergeError::Io(format!("GPU merge: {e}")))?;
            each(start, &values);
            start += len;
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(gpu_err("kernel", e));
        }
        Ok(())
    }

    /// [`Combine`] on the device.
    pub fn combine(&self, job: &Combine) -> Result<Vec<f32>, MergeError> {
        let mut inputs: Vec<&[f32]> = Vec::with_capacity(job.models.len() + 1);
        inputs.extend(job.base);
        inputs.extend(job.models.iter().copied());
        let n = inputs.first().map_or(0, |x| x.len());
        if inputs.iter().any(|x| x.len() != n) || job.keep.len() != job.models.len() {
            return Err(MergeError::Invalid("GPU merge: inputs of different lengths".into()));
        }
        let rules: Vec<Rule> = job
            .weights
            .iter()
            .zip(&job.keep)
            .map(|(w, k)| Rule::new(*w, *k))
            .collect();
        let flags = job.base.is_some() as u32 | (job.elect_sign as u32) << 1 | (job.normalize as u32) << 2;
        let header = Header {
            n: 0,
            models: job.models.len() as u32,
            offset: 0,
            flags,
            lambda: job.lambda as f32,
            stride: 0,
            pad: [0; 2],
        };
        let mut result = vec![0.0f32; n];
        self.run(
            &self.combine,
            &inputs,
            &rules,
            header,
            |len| len,
            |start, part| {
                result[start..start + part.len()].copy_from_slice(part);
            },
        )?;
        Ok(result)
    }

    /// `(a . a, b . b, a . b)`: `f32` sums per workgroup on the device,
    /// added up in `f64` here.
    pub fn dots(&self, a: &[f32], b: &[f32]) -> Result<(f64, f64, f64), MergeError> {
        if a.len() != b.len() {
            return Err(MergeError::Invalid("GPU merge: inputs of different lengths".into()));
        }
        let header = Header {
            n: 0,
            models: 0,
            offset: 0,
            flags: 0,
            lambda: 0.0,
            stride: 0,
            pad: [0; 2],
        };
        let mut sums = (0.0f64, 0.0f64, 0.0f64);
        self.run(
            &self.dots,
            &[a, b],
            &[],
            header,
            |len| len.div_ceil(GROUP) * 3,
            |_, part| {
                for p in part.chunks_exact(3) {
                    sums.0 += p[0] as f64;
                    sums.1 += p[1] as f64;
                    sums.2 += p[2] as f64;
                }
            },
        )?;
        Ok(sums)
    }
}
