"""State-dict saving and loading for the 4-bit and 8-bit modules, in bitsandbytes' exact format (docs/state_dict.md).

Two mixins, placed before the torch base class. Unlike bitsandbytes 0.49.2,
``load_state_dict`` of a quantized checkpoint works whether the module is fresh (not yet
moved to a device), quantized, or has already run forward passes, and the embedding
modules can be saved too.
"""

import warnings

import torch

from qflax import bnb_format
from qflax import checkpoint_checks as checks
from qflax import checkpoint_checks_4bit as checks_4bit
from torch_compat.nn.params import Int8Params, Params4bit


def _other_size_mismatches(module: torch.nn.Module, state_dict, prefix: str) -> list[str]:
    """torch's size-mismatch messages for the module's parameters other than ``weight``."""
    problems = []
    for name, param in module._parameters.items():
        key = f"{prefix}{name}"
        if name != "weight" and param is not None and key in state_dict and state_dict[key].shape != param.shape:
            problems.append(f"size mismatch for {key}: copying a param with shape {state_dict[key].shape} from "
                            f"checkpoint, the shape in current model is {param.shape}.")
    return problems


class FourBitCheckpoint:
    """Adds 4-bit saving/loading to a module whose ``weight`` is a :class:`Params4bit`."""

    def fix_4bit_weight_quant_state_from_module(self) -> None:
        """Restores ``weight.quant_state`` from the module (lost e.g. through FSDP), as bitsandbytes."""
        if getattr(self.weight, "quant_state", None) is not None:
            return
        if getattr(self, "quant_state", None) is None:
            warnings.warn(
                "FP4 quantization state not initialized. Please call .cuda() or .to(device) on the LinearFP4 "
                "layer first.", UserWarning, stacklevel=3,
            )
        assert self.weight.shape[1] == 1
        if not isinstance(self.weight, Params4bit):
            self.weight = Params4bit(self.weight, quant_storage=self.quant_storage, bnb_quantized=True)
        self.weight.quant_state = self.quant_state

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        state = getattr(self.weight, "quant_state", None)
        if state is None:
            return
        for key, value in state.as_dict(packed=True).items():
            destination[f"{prefix}weight.{key}"] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key = f"{prefix}weight"
        stats = {k[len(weight_key) + 1:]: v for k, v in state_dict.items() if k.startswith(weight_key + ".")}
        # Nothing of this module changes unless all of its entries fit (torch would copy the bias
        # first and then fail on it, leaving a new weight with the old bias).
        problems = _other_size_mismatches(self, state_dict, prefix)
        if stats and weight_key not in state_dict:
            problems.append(
                f"{weight_key!r}: the checkpoint holds 4-bit statistics {sorted(stats)} but no packed weight"
            )
        if problems:
            error_msgs.extend(problems)
            return
        if weight_key in state_dict and stats:
            # A packed checkpoint: rebuild the parameter from it, so the base loader copies bytes into
            # a parameter of the right shape.
            device = self.weight.device if self.weight.device.type != "meta" else "cpu"
            # Checks every entry (raising before the module changes), then the module's own settings.
            full_keys = {f"{weight_key}.{k}": v for k, v in stats.items()}  # so messages name the real keys
            loaded = Params4bit.from_prequantized(state_dict[weight_key], full_keys, device=device)
            expected = torch.Size(self._weight_shape())
            if loaded.quant_state.shape != expected:
                error_msgs.append(
                    f"size mismatch for {weight_key}: the checkpoint holds a 4-bit weight of shape "
                    f"{tuple(loaded.quant_state.shape)}, the module expects {tuple(expected)}."
                )
                return
            try:
                checks_4bit.check_4bit_target(
                    loaded.quant_state.layout(), weight_key, quant_type=self.weight.quant_type,
                    blocksize=self.weight.blocksize,
                )
            except checks.CheckpointError as err:
                error_msgs.append(str(err))
                return
            loaded.module = self
            self.quant_state = loaded.quant_state
            self.weight = loaded
        elif weight_key in state_dict and self.weight.bnb_quantized and state_dict[weight_key].is_floating_point():
            # A float checkpoint into an already quantized module: quantize it the same way.
            old = self.weight
            self.weight = Params4bit(
                state_dict[weight_key].detach().clone(), requires_grad=False, blocksize=old.blocksize,
                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                quant_storage=old.quant_storage, module=self,
            )._quantize(old.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in stats:
            if f"{weight_key}.{key}" in unexpected_keys:
                unexpected_keys.remove(f"{weight_key}.{key}")


class Int8Checkpoint:
    """Adds 8-bit ``SCB``/``weight_format`` saving/loading to a module whose ``weight`` is an :class:`Int8Params`."""

    def _int8_scale(self):
        """The row scales of the int8 weight, wherever they currently live (weight or state)."""
        scale = getattr(self.weight, "SCB", None)
        if scale is None and getattr(self, "state", None) is not None:
            scale = self.state.SCB
        return scale

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        scale = self._int8_scale()
        if self.weight.dtype == torch.int8 and scale is not None:
            destination[f"{prefix}SCB"] = scale if keep_vars else scale.detach()
            destination[f"{prefix}weight_format"] = torch.tensor(0, dtype=torch.uint8)

    @staticmethod
    def _check_weight_format(state_dict, prefix, *args) -> None:
        """Pre-hook: validates and removes ``weight_format`` (only "row" loads), as bitsandbytes."""
        value = state_dict.pop(f"{prefix}weight_format", "row")
        if f"{prefix}weight" in state_dict:
            bnb_format.weight_format_name(value)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        weight_key, scale_key = f"{prefix}weight", f"{prefix}SCB"
        incoming = state_dict.get(weight_key)
        scale = state_dict.get(scale_key)
        state = getattr(self, "state", None)
        if incoming is not None and (scale is not None or incoming.dtype == torch.int8):
            # An int8 checkpoint: weight int8 (out, in) and SCB float32 (out,), checked before anything changes.
            checks.check_int8_entries(incoming, checks.require(state_dict, scale_key), prefix,
                                      tuple(self.weight.shape))
        problems = _other_size_mismatches(self, state_dict, prefix)
        if problems:
            error_msgs.extend(problems)
            return
        if incoming is not None and incoming.dtype == torch.int8 and self.weight.dtype != torch.int8:
            # Fresh module, quantized checkpoint: take the int8 data as is.
            self.weight.data = torch.empty_like(incoming, device=self.weight.device)
        elif incoming is not None and incoming.is_floating_point() and self.weight.dtype == torch.int8:
            # Float checkpoint into a quantized module: quantize it the same way.
            fresh = Int8Params(incoming.detach().to("cpu", torch.float32).clone(), requires_grad=False,
                               has_fp16_weights=False)
            quantized = fresh._quantize(self.weight.device)
            self.weight.data, self.weight.CB, self.weight.SCB = quantized.data, quantized.CB, quantized.SCB
            if state is not None:
                state.CB = state.SCB = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if scale_key in unexpected_keys:
            unexpected_keys.remove(scale_key)
        if scale is None or self.weight.dtype != torch.int8:
            return
        scale = scale.detach().to(self.weight.device, torch.float32).clone()
        if state is not None and state.CB is not None:
            state.CB, state.SCB = self.weight.data, scale
        else:
            self.weight.CB, self.weight.SCB = self.weight.data, scale
