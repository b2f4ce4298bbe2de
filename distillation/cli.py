"""``mamba-hybrid distill CONFIG.yaml [--set key=value ...]``."""
from __future__ import annotations

import argparse
import sys

import yaml

from .config import ConfigError, load_config


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    return key, yaml.safe_load(value)


def distill_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mamba-hybrid distill",
                                description="Distil a Llama teacher into a hybrid Mamba model.")
    p.add_argument("config", help="YAML config (see examples/)")
    p.add_argument("--set", dest="overrides", action="append", type=_override, default=[],
                   metavar="KEY=VALUE", help="override a config key, e.g. --set stages.distill.steps=10")
    args = p.parse_args(argv)

    import transformers
    transformers.utils.logging.disable_progress_bar()
    from .launch import TrainingFailed
    from .pipeline import run_pipeline
    cfg = None
    try:
        cfg = load_config(args.config, dict(args.overrides))
        summary = run_pipeline(cfg, log=lambda m: print(m, flush=True))
    except KeyboardInterrupt:
        where = f" in {cfg.output_dir}" if cfg is not None else ""
        print(f"mamba-hybrid distill: interrupted; run the same command again to resume from "
              f"the last checkpoint{where}", file=sys.stderr)
        return 130
    except ConfigError as e:
        print(f"mamba-hybrid distill: config error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"mamba-hybrid distill: {e}", file=sys.stderr)
        return 1
    print(f"done: final model {summary['final_model']}"
          + (f", exported to {summary['export_dir']}" if "export_dir" in summary else ""))
    return 0


if __name__ == "__main__":
    sys.exit(distill_main(sys.argv[1:]))
