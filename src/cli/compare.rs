use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use firstkd::eval::{
    read_task, reliability_svg, ClozeLayout, EvalOptions, Mode, PromptOptions, TaskFormat,
};

use super::eval::{evaluate_task, load_model};

/// Arguments of `firstkd compare`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// A model as NAME=PATH (GGUF file or checkpoint directory); repeat for several.
    #[arg(long = "model", required = true, value_parser = parse_named)]
    pub models: Vec<(String, PathBuf)>,
    /// A task as NAME=FILE; repeat for several.
    #[arg(long = "task", required = true, value_parser = parse_named)]
    pub tasks: Vec<(String, PathBuf)>,
    /// Record shape of every task file: auto, generic, boolq, csqa, obqa, arc.
    #[arg(long, value_enum, default_value_t = TaskFormat::Auto)]
    pub task_format: TaskFormat,
    /// Scoring mode: cloze or letter.
    #[arg(long, value_enum, default_value_t = Mode::Cloze)]
    pub mode: Mode,
    /// Wrap prompts in each model's chat template.
    #[arg(long)]
    pub chat_template: bool,
    /// Evaluate only the first N items of each task.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Padded tokens per forward pass.
    #[arg(long, default_value_t = 4096)]
    pub batch_tokens: usize,
    /// Cloze: `shared` computes each question's prompt once with every option after it;
    /// `separate` runs one full sequence per option. The scores are the same.
    #[arg(long, value_enum, default_value_t = ClozeLayout::Shared)]
    pub cloze_layout: ClozeLayout,
    /// Print a Markdown table.
    #[arg(long, conflicts_with = "csv")]
    pub markdown: bool,
    /// Print CSV.
    #[arg(long)]
    pub csv: bool,
    /// Write one reliability diagram per model and task (MODEL-TASK.svg) and every report with
    /// its wall time (reports.json) into this directory.
    #[arg(long)]
    pub plot_dir: Option<PathBuf>,
    /// cpu, or cuda[:N] (needs the `cuda` cargo feature).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn parse_named(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("{s:?}: expected NAME=PATH")),
    }
}

pub fn run(args: Args, out: &mut dyn Write) -> anyhow::Result<u8> {
    let mode = args.mode;
    anyhow::ensure!(
        mode != Mode::Both,
        "--mode: compare takes one mode (cloze or letter)"
    );
    let format = args.task_format;
    let opts = EvalOptions {
        mode,
        prompt: PromptOptions {
            chat_template: args.chat_template,
        },
        batch_tokens: args.batch_tokens,
        cloze_layout: args.cloze_layout,
        ..EvalOptions::default()
    };
    let mut header = vec!["model".to_string()];
    for (task, _) in &args.tasks {
        header.push(format!("{task} acc"));
        header.push(format!("{task} ECE"));
    }
    let mut task_items = Vec::with_capacity(args.tasks.len());
    for (_, file) in &args.tasks {
        task_items.push(read_task(file, format, args.limit)?);
    }
    if let Some(dir) = &args.plot_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut details = Vec::new();
    let mut rows = Vec::new();
    let device = super::device(&args.device)?;
    for (name, path) in &args.models {
        let model = load_model(path, &device)?;
        let mut row = vec![name.clone()];
        for ((task, file), items) in args.tasks.iter().zip(&task_items) {
            let (result, seconds) =
                evaluate_task(&model, file, items, &opts, &format!("{name} {task}"))?;
            if let Some(dir) = &args.plot_dir {
                let svg = reliability_svg(&format!("{name} on {task}"), &result.reports);
                let path = dir.join(format!("{name}-{task}.svg"));
                std::fs::write(&path, svg)
                    .with_context(|| format!("writing {}", path.display()))?;
                details.push(serde_json::json!({
                    "model": name, "path": path.display().to_string(), "task": task,
                    "file": file.display().to_string(), "n_items": result.items.len(),
                    "seconds": seconds, "tokens": result.tokens,
                    "forward_passes": result.forward_passes, "reports": result.reports,
                }));
            }
            let r = result
                .reports
                .first()
                .ok_or_else(|| anyhow::anyhow!("no report for {task}"))?;
            row.push(format!("{:.4}", r.accuracy));
            row.push(format!("{:.4}", r.calibration.ece));
        }
        rows.push(row);
    }
    if let Some(dir) = &args.plot_dir {
        let path = dir.join("reports.json");
        let text = serde_json::to_string_pretty(&details)?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.csv {
        writeln!(out, "{}", header.join(","))?;
        for row in &rows {
            writeln!(out, "{}", row.join(","))?;
        }
    } else if args.markdown {
        writeln!(out, "| {} |", header.join(" | "))?;
        let align: Vec<&str> = header
            .iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { "---" } else { "---:" })
            .collect();
        writeln!(out, "|{}|", align.join("|"))?;
        for row in &rows {
            writeln!(out, "| {} |", row.join(" | "))?;
        }
    } else {
        super::print_table(&header, &rows, 1, out)?;
    }
    writeln!(
        out,
        "(mode {}, ECE over 15 equal-width bins)",
        mode.as_str()
    )?;
    Ok(0)
}
