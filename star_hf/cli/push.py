"""``star-hf push``: upload a STAR checkpoint or adapter folder to the Hugging Face Hub with a model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from star_hf.cli._util import (
    CliError,
    check_model_dir,
    check_new_dir,
    check_safetensors,
    cli_command,
    command_parser,
    is_adapter_folder,
)

EPILOG = """examples:
  star-hf push ./mixtral-star me/mixtral-star                   # the full STAR checkpoint
  star-hf push ./mixtral-star me/mixtral-star-adapter --kind adapter --private
  star-hf push ./mixtral-star me/mixtral-folded --kind folded --license apache-2.0
  star-hf push ./star-adapter me/mixtral-star-adapter --base-model mistralai/Mixtral-8x7B-v0.1
  star-hf push ./mixtral-star me/mixtral-star --stage-only ./staged   # write the folder, upload nothing

DIR is a STAR checkpoint (save_pretrained of a patched model, star-hf upgrade) or a STAR adapter folder
(star_hf.save_adapter). --kind: "full" uploads the checkpoint, "adapter" only the STAR router tensors,
"folded" a stock checkpoint of the folded model; an adapter folder can only be pushed as an adapter.
The token comes from --token, else from HF_TOKEN or `hf auth login`.
"""


def add_parser(sub: argparse._SubParsersAction, name: str) -> None:
    p = command_parser(
        sub,
        name,
        help="upload a STAR checkpoint or adapter to the Hugging Face Hub",
        description="Stage a STAR checkpoint or adapter folder with a generated model card and upload it "
        "to a Hub model repository (created if needed).",
        epilog=EPILOG,
    )
    p.add_argument("dir", metavar="DIR", help="STAR checkpoint folder or STAR adapter folder")
    p.add_argument("repo_id", metavar="REPO_ID", help='Hub repository, "user/name"')
    p.add_argument("--kind", choices=("adapter", "full", "folded"), help="what to upload (default: what DIR holds)")
    p.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--token", help="Hugging Face token (default: HF_TOKEN or the stored login)")
    p.add_argument("--revision", help="branch to commit to (created if missing)")
    p.add_argument("--commit-message", help="commit message")
    p.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    p.add_argument("--license", help="license of the card (default: inherited from the base model's card)")
    p.add_argument("--base-model", metavar="REPO_ID", help="Hub id of the base model, for the card metadata")
    p.add_argument("--stage-only", metavar="OUT_DIR", help="write the folder that would be uploaded and stop")
    p.set_defaults(run=run)


@cli_command
def run(args: argparse.Namespace) -> int:
    from star_hf.hub.upload import check_repo_id, push_to_hub, stage_for_hub
    from star_hf.persistence.loading import from_pretrained
    from star_hf.persistence.text import load_tokenizer

    folder = Path(args.dir)
    if not folder.is_dir():
        raise CliError(f"folder {folder} does not exist.")
    check_repo_id(args.repo_id)
    stage_dir = check_new_dir(args.stage_only, overwrite=False) if args.stage_only else None
    if is_adapter_folder(folder):
        if args.kind not in (None, "adapter"):
            raise CliError(
                f"{folder} is a STAR adapter folder: it can only be pushed as --kind adapter. For a full or folded "
                "checkpoint, load the base model, apply the adapter (star_hf.load_adapter) and save_pretrained it first."
            )
        source, kind, tokenizer = folder, "adapter", None
    else:
        check_model_dir(str(folder), "STAR checkpoint")
        check_safetensors(folder)
        source, kind, tokenizer = from_pretrained(str(folder)), args.kind or "full", load_tokenizer(folder, fallback="none")
    card = {"license": args.license, "base_model": args.base_model, "tokenizer": tokenizer}
    if stage_dir is not None:
        stage_for_hub(source, stage_dir, kind, repo_id=args.repo_id, **card)
        print(f"staged the {kind} upload for {args.repo_id} in {stage_dir} (nothing was uploaded)")
        return 0
    info = push_to_hub(
        source,
        args.repo_id,
        kind,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
        revision=args.revision,
        create_pr=args.create_pr,
        **card,
    )
    print(f"pushed the {kind} upload to {args.repo_id}: {getattr(info, 'commit_url', '')}")
    return 0
