//! `expanse plan`: the expansion plan of a checkpoint (or of a preset's shapes) — which source layer
//! each output layer copies, which tensors are scaled, and the sizes — as a table or JSON.

use clap::Args;

use super::args::{DeviceArgs, SourceArgs};
use super::{print_json, select_device, Failure};
use crate::engine;
use crate::expand::Plan;
use crate::quant::QuantType;

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    source: SourceArgs,
    // Sizes are in --dtype, whose `auto` depends on --device.
    #[command(flatten)]
    run: DeviceArgs,
    /// Plan for a preset's or config.json's shapes instead of --model (e.g. openchat-3.5-0106)
    #[arg(long, value_name = "PRESET|CONFIG.json", conflicts_with_all = ["model", "revision"])]
    synthetic: Option<String>,
    /// Print JSON instead of a table
    #[arg(long)]
    json: bool,
}

/// `expanse plan`
pub fn run(args: PlanArgs) -> Result<(), Failure> {
    let PlanArgs { source, run, synthetic, json } = args;
    let (config, stored, name) = match &synthetic {
        Some(spec) => {
            let cfg = crate::synthetic::config(spec)?;
            engine::check_plan_fits(&cfg, spec)?;
            let stored = cfg.dtype;
            (cfg, stored, spec.clone())
        }
        None => {
            let opened = source.checkpoint.open()?;
            let stored = opened.stored_dtype();
            (opened.config, stored, source.checkpoint.model.clone())
        }
    };
    let plan = Plan::from_spec(&source.expand, config.num_hidden_layers, &name)?;
    for w in &plan.warnings {
        eprintln!("warning: {w}");
    }
    let device = select_device(&run.device)?;
    let (dtype, _) = crate::device::dtype(&run.dtype, &device, stored)?;
    let quant = run.quant.as_deref().map(|q| QuantType::parse(q, "--quant")).transpose()?;
    if json {
        let totals = plan.totals_as(&config, dtype, quant);
        let quant = quant.map(|q| q.name());
        print_json(&serde_json::json!({ "spec": plan.spec, "plan": plan, "quant": quant, "totals": totals }))?;
    } else {
        println!("{}", plan.table(&config, dtype, quant));
    }
    Ok(())
}
