"""Worker for tests/test_distributed.py: train from a config, then save this process's own parameters.

    python tests/_dist_train.py OUT [--config CONFIG] [section.key=value ...]   (CONFIG defaults to configs/ring.yaml)
"""
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from sdekit.config import load_config
from sdekit.training import train

if __name__ == "__main__":
    out, args = Path(sys.argv[1]), sys.argv[2:]
    config = Path(__file__).resolve().parents[1] / "configs/ring.yaml"
    if args[:1] == ["--config"]:
        config, args = Path(args[1]), args[2:]
    cfg = load_config(config, [f"train.out_dir={out}", *args])
    result = train(cfg, progress=False)
    # Every process keeps its own replica after training; save it so the test can compare ranks.
    params = {k: v.detach().contiguous().cpu() for k, v in result["model"].state_dict().items()}
    save_file(params, str(out / f"rank{PartialState().process_index}.safetensors"))
