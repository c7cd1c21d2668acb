"""
Writes the Hub README (model card) of a QualiCLIP folder from the template and the result files of `training/`.

    python model_card/generate.py --model-dir qualiclip_hf/demo_model --weights demo \
        --results training/results/demo/synthetic_eval.json training/results/demo/training_summary.json
    python model_card/generate.py --model-dir qualiclip-hf/ --weights official --repo-id ORG/NAME \
        --results koniq.json clive.json --output README.md

The generator itself is `qualiclip_hf.model_card` (installed with the package, so that `qualiclip push` can make
a card for a folder without one); its template is `qualiclip_hf/model_card_template.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qualiclip_hf.model_card import WEIGHT_KINDS, ModelCardError, write_model_card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True, type=Path, help="the saved QualiCLIP folder")
    parser.add_argument("--weights", choices=WEIGHT_KINDS, help="what the weights are (inferred for demo/trained)")
    parser.add_argument("--results", nargs="+", type=Path, default=[], metavar="FILE", help="result JSON files")
    parser.add_argument("--repo-id", help="the Hub repository the card is for (usage examples, model-index name)")
    parser.add_argument("--license", help="a Hub licence id (default: by weight kind)")
    parser.add_argument("--base-model", help="Hub id of the base model")
    parser.add_argument("--dataset", nargs="+", dest="datasets", metavar="ID", help="Hub ids of the training data")
    parser.add_argument("--output", type=Path, help="where to write (default: MODEL_DIR/README.md)")
    args = parser.parse_args(argv)
    try:
        output = write_model_card(
            args.model_dir,
            args.output,
            weights=args.weights,
            results=args.results,
            repo_id=args.repo_id,
            license=args.license,
            base_model=args.base_model,
            datasets=args.datasets,
        )
    except ModelCardError as error:
        print(f"generate.py: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
