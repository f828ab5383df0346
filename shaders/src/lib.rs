//! hone's GPU kernels, written once in CubeCL and compiled to WGSL (WebGPU, Vulkan, Metal) and
//! CUDA. Each is checked bit for bit against the CPU reference and bitsandbytes (see the NF4
//! tests in crates/hone and crates/hone-web).

pub mod adamw;
pub mod matmul;
pub mod nf4;
pub mod nf4_matmul;
pub mod swiglu;
pub mod unpack;
