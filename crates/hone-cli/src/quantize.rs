use hone::io::Dir;
use hone::model::quantize::quantize_to_dir;
use hone::model::Nf4Options;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face model directory (F32, F16 or BF16 safetensors; a GGUF file is refused, saying so).
    #[arg(long)]
    model: PathBuf,
    /// The new directory (must not exist), loadable as 4-bit by transformers + bitsandbytes.
    #[arg(long)]
    out: PathBuf,
    /// NF4 block size (a power of two, 32 to 4096).
    #[arg(long, default_value_t = 64)]
    blocksize: usize,
    /// Keep the absmax in f32 instead of quantizing it again (double quantization is on by default).
    #[arg(long)]
    no_double_quant: bool,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    args.model = crate::hub::model_path(&args.model)?;
    crate::model::require_dir(&args.model, "hone quantize writes bitsandbytes' layout beside the model's own config and tokenizer files")?;
    let options = Nf4Options { blocksize: args.blocksize, double_quant: !args.no_double_quant };
    let r = quantize_to_dir(&Dir(args.model.clone()), &args.out, options)?;
    eprintln!(
        "quantized {} linear layers to NF4 into {}: weights {:.1} MB -> {:.1} MB",
        r.quantized,
        args.out.display(),
        r.bytes_before as f64 / 1e6,
        r.bytes_after as f64 / 1e6
    );
    Ok(())
}
