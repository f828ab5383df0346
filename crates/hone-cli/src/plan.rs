//! `hone plan`: the memory a fine-tune needs, from the model's config alone (no weights read),
//! so a big job can be sized before it starts.

use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::train::plan::{estimate, human};
use hone::train::RunSettings;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A Hugging Face directory (only config.json is read) or a GGUF file (only its header).
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 16)]
    rank: usize,
    /// all-linear, a comma-separated list, or a regex.
    #[arg(long, default_value = "all-linear")]
    targets: String,
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    #[arg(long, default_value_t = 512)]
    max_len: usize,
    /// nf4 (QLoRA) or none.
    #[arg(long, default_value = "nf4")]
    quantize: String,
    /// One JSON line instead of the table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = crate::model::resolve(a.model.as_deref())?;
    let config = if path.is_file() {
        hone::model::gguf::config_from_gguf(&Gguf::open(Box::new(FileSource::open(&path)?))?)?
    } else {
        hone::model::load::read_config(&Dir(path.clone()))?
    };
    let settings = RunSettings { rank: Some(a.rank), targets: Some(a.targets.clone()), quantize: Some(a.quantize.clone()), ..Default::default() };
    let nf4 = settings.nf4()?.is_some();
    let p = estimate(&config, &settings.lora(), a.batch_size, a.max_len, nf4);
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    println!("{} ({}, {} layers, hidden {}, vocab {})", path.display(), config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size);
    println!("  base weights ({})      {:>10}", if nf4 { "NF4" } else { "f32" }, human(p.base_bytes));
    println!("  LoRA r={} ({} params) {:>10}  (weights, gradients, AdamW moments)", a.rank, p.lora_params, human(p.lora_bytes));
    println!("  activations (batch {} × {}) {:>10}", a.batch_size, a.max_len, human(p.activation_bytes));
    println!("  total                     {:>10}", human(p.total_bytes));
    println!("  largest single buffer     {:>10}  ({})", human(p.largest_buffer_bytes), p.largest_buffer);
    Ok(())
}
