use hone::io::Dir;
use hone::lora::merge::merge_to_dir;
use hone::lora::peft::Adapter;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// The base model the adapter was trained on: a Hugging Face directory (a GGUF base is refused, saying so).
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// The new model directory (must not exist).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    crate::model::require_dir(&args.model, "hone merge writes the merged model as safetensors beside the base's own config and tokenizer files")?;
    let adapter = Adapter::read(&Dir(args.adapter.clone()))?;
    let report = merge_to_dir(&Dir(args.model.clone()), &adapter, &args.out)?;
    if report.dequantized_nf4_base {
        eprintln!("note: the base is an NF4 checkpoint; the adapter was merged into its dequantized weights and the output is a dense f32 model");
    }
    eprintln!(
        "merged {} adapted layers into {} ({} tensors; W + {}·B·A in f32, stored in the base's dtypes)",
        report.merged_layers,
        args.out.display(),
        report.tensors,
        adapter.scaling()
    );
    Ok(())
}
