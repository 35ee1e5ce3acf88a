# Regenerates the fixtures: run `python make_fixtures.py` in this folder, with torch, numpy and
# safetensors installed. The tests only read the outputs, so CI needs no Python.
import torch, numpy as np
from safetensors.torch import save_file
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.BatchNorm2d(4))
m.eval()
sd = m.state_dict()          # OrderedDict with _metadata (BUILD), i64 num_batches_tracked
base = torch.arange(30, dtype=torch.float32).reshape(5, 6) / 7
sd["half"] = torch.randn(2, 3).half()
sd["bf16"] = torch.randn(4).bfloat16()
sd["f64"] = torch.randn(2, 2, dtype=torch.float64)
sd["int"] = torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)
sd["view.t"] = base.t()              # non-contiguous
sd["view.slice"] = base[1:4, 2:5]    # offset + strides, shares base's storage
sd["view.base"] = base
sd["view.expand"] = torch.tensor([1.5, 2.5]).expand(3, 2)   # stride 0
sd["scalar"] = torch.tensor(3.25)
sd["empty"] = torch.zeros(0, 3)
torch.save(sd, "tiny_state_dict.bin")
torch.save({"state_dict": {"w": base.t()}, "epoch": 3}, "nested.bin", pickle_protocol=4)
save_file({k: v.contiguous() for k, v in sd.items()}, "tiny_state_dict.safetensors")
np.save("f64_fortran.npy", np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4) / 3))
np.save("u8.npy", np.arange(6, dtype=np.uint8).reshape(3, 2))
