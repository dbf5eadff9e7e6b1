"""A training run's state at the end of each epoch, so that a run killed after hours continues where it stopped.

``OUT/.checkpoints/NAME.safetensors`` holds the tensors (the model's state, the optimizer's buffers, the shuffling
generator's state) and ``NAME.json`` the rest (epochs done, optimizer settings, and the run's signature: recipe,
data, seed). Tensors as safetensors, never pickle (docs/design.md, principle 6). Restoring all three makes a resumed
run the very run that was never stopped: the next epoch draws the same batches and augmentations and takes the same
optimizer steps. A checkpoint of another recipe, data set or seed is refused, never silently continued.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.files import atomic_write, write_json

from .weights import WeightsError


class Checkpoint:
    """Epoch checkpoints of model ``name`` training into ``out_dir``, for a run described by ``signature``."""

    def __init__(self, out_dir: str | Path, name: str, signature: dict) -> None:
        folder = Path(out_dir) / ".checkpoints"
        self.tensors, self.meta = folder / f"{name}.safetensors", folder / f"{name}.json"
        self.name, self.signature = name, json.loads(json.dumps(signature))      # JSON's view: tuples -> lists

    def exists(self) -> bool:
        return self.meta.exists()

    def recorded(self) -> dict:
        """The signature of the saved run ({} where there is none)."""
        return json.loads(self.meta.read_text())["signature"] if self.exists() else {}

    def save(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
             epochs_done: int) -> None:
        state = optimizer.state_dict()
        tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        scalars = {}
        for index, buffers in state["state"].items():
            for key, value in buffers.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        tensors["generator"] = generator.get_state()
        self.tensors.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.tensors, lambda tmp: save_file(tensors, str(tmp)))
        write_json(self.meta, {"name": self.name, "epochs_done": epochs_done, "signature": self.signature,
                               "param_groups": state["param_groups"], "optimizer_scalars": scalars})

    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> int:
        """Load the saved state into the three; returns the epochs done (0 where there is no checkpoint)."""
        if not self.exists():
            return 0
        meta = json.loads(self.meta.read_text())
        if meta["signature"] != self.signature:
            differ = sorted(k for k in {*meta["signature"], *self.signature}
                            if meta["signature"].get(k) != self.signature.get(k))
            raise WeightsError(f"the checkpoint {self.meta} is of another run ({', '.join(differ)} differ); "
                               "pass --overwrite to start again")
        tensors = load_file(str(self.tensors))
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        state: dict = {"state": {}, "param_groups": meta["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                index, name = key[len("optimizer."):].split(".", 1)
                state["state"].setdefault(int(index), {})[name] = value
        for key, value in meta["optimizer_scalars"].items():
            index, name = key.split(".", 1)
            state["state"].setdefault(int(index), {})[name] = value
        optimizer.load_state_dict(state)
        generator.set_state(tensors["generator"])
        return int(meta["epochs_done"])

    def remove(self) -> None:
        """Once the weights are written the checkpoint has served."""
        self.tensors.unlink(missing_ok=True)
        self.meta.unlink(missing_ok=True)
