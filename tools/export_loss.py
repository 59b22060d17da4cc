#!/usr/bin/env python3
"""Loads an export of `launch/moe export` in PyTorch and computes the mean cross-entropy of a batch.

    python3 tools/export_loss.py EXPORT_DIR TOKEN_FILE [--sequences N] [--dtype float64|float32]

EXPORT_DIR holds model.safetensors and config.json. The batch is sequences 0 .. N-1 of TOKEN_FILE (a
MOETOK01 file of `launch/moe data`, or an llm.c shard): sequence j is the S + 1 tokens from j*S, inputs
the first S, targets the last S. N defaults to what `launch/moe eval` takes (train.eval_tokens / S, at
most (tokens - 1) / S), so the printed loss is the checkpoint's validation loss. The model follows
docs/ARCHITECTURE.md "Model and checkpoint" in evaluation mode: each sequence routed as its own capacity
group, no noise. Forced routing is not implemented here (an error says so).

The weights are read with the safetensors package when it is installed (safetensors.torch.load_file),
otherwise with the 20 lines of read_safetensors() below (the format is an 8-byte header length, a JSON
header, then the raw tensors).
"""
import argparse
import json
import math
import struct
import sys

import torch


def read_safetensors(path):
    dtypes = {"F32": torch.float32, "F64": torch.float64, "BF16": torch.bfloat16, "I32": torch.int32}
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        raw = bytearray(data[8 + n + begin:8 + n + end])
        out[name] = torch.frombuffer(raw, dtype=dtypes[e["dtype"]]).reshape(e["shape"]) if raw else \
            torch.zeros(e["shape"], dtype=dtypes[e["dtype"]])
    return out


def load_weights(path):
    try:
        from safetensors.torch import load_file
    except ImportError:
        return read_safetensors(path)
    return load_file(path)


def read_tokens(path):
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] == b"MOETOK01":
        width, count = struct.unpack("<I", data[12:16])[0], struct.unpack("<Q", data[16:24])[0]
        body = data[32:32 + width * count]
        return list(body) if width == 1 else list(struct.unpack("<%dH" % count, body))
    magic, _version, count = struct.unpack("<3i", data[:12])
    if magic != 20240520:
        raise SystemExit("%s: not a MOETOK01 file nor an llm.c shard" % path)
    return list(struct.unpack("<%dH" % count, data[1024:1024 + 2 * count]))


class Model:
    def __init__(self, config, weights, dtype):
        self.c, self.m, self.moe = config, config["model"], config["moe"]
        self.w = {k: v.to(dtype) for k, v in weights.items()}
        self.moe_layers = set(self.moe["moe_layers"])
        if self.moe["force_routing"] != "off":
            raise SystemExit("moe.force_routing %s is not implemented here" % self.moe["force_routing"])

    def rms_norm(self, x, weight):
        return x * weight / torch.sqrt((x * x).mean(-1, keepdim=True) + self.m["norm_eps"])

    def act(self, f, w_gate, w_up, kind):
        up = f @ w_up.T
        if kind == "swiglu":
            g = f @ w_gate.T
            return g * torch.sigmoid(g) * up
        if kind == "gelu":
            return 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up ** 3)))
        return torch.relu(up)

    def ffn(self, f, prefix, kind="swiglu"):
        w = self.w
        return self.act(f, w.get(prefix + ".w_gate"), w[prefix + ".w_up"], kind) @ w[prefix + ".w_down"].T

    def attention(self, a, l, seqs, seq_len):
        m, w = self.m, self.w
        nh, nkv, d = m["heads"], m["kv_heads"], m["head_dim"]
        p = "layers.%d.attn." % l
        q = (a @ w[p + "wq"].T).view(seqs, seq_len, nh, d)
        k = (a @ w[p + "wk"].T).view(seqs, seq_len, nkv, d)
        v = (a @ w[p + "wv"].T).view(seqs, seq_len, nkv, d)
        half = d // 2
        i = torch.arange(half, dtype=torch.float64)
        angle = torch.arange(seq_len, dtype=torch.float64)[:, None] * m["rope_base"] ** (-2.0 * i / d)
        cos, sin = torch.cos(angle).to(a.dtype)[None, :, None, :], torch.sin(angle).to(a.dtype)[None, :, None, :]

        def rope(x):
            x1, x2 = x[..., :half], x[..., half:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

        q, k = rope(q), rope(k)
        g = nh // nkv
        k, v = k.repeat_interleave(g, dim=2), v.repeat_interleave(g, dim=2)
        s = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(d)
        mask = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        s = s.masked_fill(~mask, float("-inf"))
        o = torch.einsum("bhij,bjhd->bihd", torch.softmax(s, -1), v).reshape(seqs * seq_len, nh * d)
        return o @ w[p + "wo"].T

    def moe_ffn(self, f, l, seqs, seq_len):
        moe, w = self.moe, self.w
        p = "layers.%d.moe." % l
        E, k = moe["num_experts"], moe["top_k"]
        u = f @ w[p + "router.weight"].T
        s = torch.sigmoid(u) if moe["score"] == "sigmoid" else torch.softmax(u, -1)
        bias = w.get(p + "router.balance_bias", torch.zeros(E, dtype=f.dtype))
        # top-k of s + b, ties to the lower index: a stable descending sort
        chosen = torch.sort(s + bias, dim=-1, descending=True, stable=True).indices[:, :k]
        score = torch.gather(s, 1, chosen)
        gate = score
        if moe["normalize_topk"]:
            total = score.sum(-1, keepdim=True)
            gate = torch.where(total > 0, score / total, torch.zeros_like(score))
        # capacity: each sequence is its own group of G = S tokens
        keep = torch.ones_like(chosen, dtype=torch.bool)
        cf = moe["capacity_factor"]
        if cf > 0:
            G = seq_len
            cap = min(G, max(moe["min_capacity"], math.ceil(k * G * cf / E * (1 - 1e-12))))
            cap = max(cap, 1)
            for b in range(seqs):
                rows = list(range(b * G, (b + 1) * G))
                if moe["priority"] == "batch":
                    rows.sort(key=lambda t: (-float(score[t, 0]), t))
                count = [0] * E
                for j in range(k):
                    for t in rows:
                        e = int(chosen[t, j])
                        if count[e] < cap:
                            count[e] += 1
                        else:
                            keep[t, j] = False
        y = torch.zeros_like(f)
        kind = moe["expert_type"]
        for e in range(E):
            t, j = torch.nonzero((chosen == e) & keep, as_tuple=True)
            if len(t) == 0:
                continue
            pe = p + "experts."
            gate_w = w[pe + "w_gate"][e] if kind == "swiglu" else None
            out = self.act(f[t], gate_w, w[pe + "w_up"][e], kind) @ w[pe + "w_down"][e].T
            y.index_add_(0, t, gate[t, j][:, None] * out)
        if moe["num_shared_experts"] > 0:
            y = y + self.ffn(f, p + "shared", kind)
        return y

    def loss(self, inputs, targets, seqs, seq_len):
        w = self.w
        x = w["embedding"][inputs]
        for l in range(self.m["layers"]):
            x = x + self.attention(self.rms_norm(x, w["layers.%d.attn_norm" % l]), l, seqs, seq_len)
            f = self.rms_norm(x, w["layers.%d.ffn_norm" % l])
            if l in self.moe_layers:
                x = x + self.moe_ffn(f, l, seqs, seq_len)
            else:
                x = x + self.ffn(f, "layers.%d.ffn" % l)
        head = w["embedding"] if self.m["tie_embeddings"] else w["head"]
        logits = self.rms_norm(x, w["final_norm"]) @ head.T
        return torch.nn.functional.cross_entropy(logits, targets).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("export_dir")
    ap.add_argument("token_file")
    ap.add_argument("--sequences", type=int, default=0, help="default: what launch/moe eval takes")
    ap.add_argument("--dtype", choices=["float64", "float32"], default="float64", help="compute type")
    args = ap.parse_args()
    with open(args.export_dir + "/config.json") as f:
        config = json.load(f)
    if config.get("format") != "moe-export":
        raise SystemExit("%s/config.json: not an export of launch/moe export" % args.export_dir)
    seq_len = config["model"]["seq_len"]
    tokens = read_tokens(args.token_file)
    fit = (len(tokens) - 1) // seq_len
    if fit < 1:
        raise SystemExit("%s: fewer than seq_len + 1 = %d tokens" % (args.token_file, seq_len + 1))
    n = args.sequences
    if n <= 0:
        eval_tokens = int(float(config["config"].get("train.eval_tokens", "0")))
        n = min(max(1, eval_tokens // seq_len), fit) if eval_tokens > 0 else fit
    n = min(n, fit)
    seqs = torch.tensor([tokens[j * seq_len:j * seq_len + seq_len + 1] for j in range(n)], dtype=torch.long)
    model = Model(config, load_weights(args.export_dir + "/model.safetensors"), getattr(torch, args.dtype))
    with torch.no_grad():
        loss = model.loss(seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1), n, seq_len)
    print("loss %.12f nats/token over %d sequences of %d tokens (%.6f bits/token)" % (loss, n, seq_len,
                                                                                      loss / math.log(2)))


if __name__ == "__main__":
    main()
