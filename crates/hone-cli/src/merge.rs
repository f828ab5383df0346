use anyhow::Context;
use hone::export::gguf_hf::hf_to_gguf;
use hone::export::gguf_merge::{merge_gguf, MergedType};
use hone::io::gguf::Gguf;
use hone::io::{Dir, FileSource};
use hone::lora::merge::merge_to_dir;
use hone::lora::peft::Adapter;
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct Args {
    /// The base model the adapter was trained on: a Hugging Face directory, or a GGUF file (for
    /// --gguf).
    #[arg(long)]
    model: PathBuf,
    /// The PEFT LoRA adapter directory.
    #[arg(long)]
    adapter: PathBuf,
    /// Write the merged model as a Hugging Face directory here (must not exist) (or give --gguf).
    #[arg(long, required_unless_present = "gguf", conflicts_with = "gguf")]
    out: Option<PathBuf>,
    /// Write the merged model as one GGUF file llama.cpp loads, with the base's tokenizer and chat
    /// template (a GGUF base's metadata kept; a Hugging Face base's written as llama.cpp's
    /// convert_hf_to_gguf.py writes it) (or give --out).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// How --gguf stores the merged matrices: f32, f16, q8_0 or q4_0 (vectors stay f32).
    #[arg(long = "type", default_value = "f16", value_parser = ["f32", "f16", "q8_0", "q4_0"])]
    ty: String,
    /// `general.name` of a GGUF written from a Hugging Face base (llama.cpp's converter's
    /// --model-name) [default: the directory's name].
    #[arg(long)]
    name: Option<String>,
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    if let Some(id) = crate::hub::id_of(&args.model) {
        // A Hub id's snapshot directory is named by its commit: name the GGUF for the model.
        args.name = args.name.or_else(|| id.repo.rsplit('/').next().map(str::to_string));
    }
    args.model = crate::hub::model_path(&args.model)?;
    let adapter = Adapter::read(&Dir(args.adapter.clone()))?;
    if let Some(gguf) = &args.gguf {
        return run_gguf(&args, &adapter, gguf);
    }
    let out = args.out.as_ref().expect("clap requires --out or --gguf");
    crate::model::require_dir(&args.model, "hone merge --out writes the merged model as safetensors beside the base's own config and tokenizer files (--gguf writes a GGUF)")?;
    let report = merge_to_dir(&Dir(args.model.clone()), &adapter, out)?;
    if report.dequantized_nf4_base {
        eprintln!("note: the base is an NF4 checkpoint; the adapter was merged into its dequantized weights and the output is a dense f32 model");
    }
    eprintln!(
        "merged {} adapted layers into {} ({} tensors; W + {}·B·A in f32, stored in the base's dtypes)",
        report.merged_layers,
        out.display(),
        report.tensors,
        adapter.scaling()
    );
    Ok(())
}

fn run_gguf(args: &Args, adapter: &Adapter, out: &Path) -> anyhow::Result<()> {
    let ty = MergedType::parse(&args.ty).expect("clap checks --type");
    let hf = args.model.is_dir();
    let base = if hf { None } else { Some(Gguf::open(Box::new(FileSource::open(&args.model)?))?) };
    let name = args.name.clone().unwrap_or_else(|| args.model.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let tmp = out.with_extension(format!("tmp.{}", std::process::id()));
    let written = (|| -> anyhow::Result<_> {
        let mut file = std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?);
        let mut sink = |bytes: &[u8]| file.write_all(bytes).map_err(|e| hone::Error::io(tmp.display(), e));
        let report = match &base {
            Some(base) => merge_gguf(base, adapter, ty, &mut sink)?,
            None => hf_to_gguf(&Dir(args.model.clone()), Some(adapter), ty, &name, &mut sink)?,
        };
        file.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(report)
    })();
    let report = match written {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    eprintln!(
        "merged {} adapted layers into {} ({} tensors as {}, {:.1} MB; W + {}·B·A in f32, with {}'s tokenizer and chat template)",
        report.merged_layers,
        out.display(),
        report.tensors,
        args.ty,
        report.bytes as f64 / 1e6,
        adapter.scaling(),
        args.model.display()
    );
    Ok(())
}
