"""comfy/sd1_clip.py, mirrored small where AlignIT's results depend on it:

- ``parse_parentheses`` (l.302), ``token_weights`` (l.330: ``(x)`` multiplies the weight by 1.1, ``(x:w)`` sets it),
  ``escape_important``/``unescape_important`` (l.350-358: ``\\(`` and ``\\)`` are literal);
- ``load_embed`` (l.397-466): ``name``, ``name.safetensors``, ``.pt`` or ``.bin`` in an embedding folder (no escape
  with ``..``); ``string_to_param`` (A1111 files), the text encoder's own key (``clip_l``, ``clip_g``), else the
  first tensor (the real one also reads lists and LoRA-bundled embeddings);
- ``SDTokenizer`` (l.468-648): its attributes, ``_try_get_embedding`` (l.518) and ``tokenize_with_weights``
  (l.541-642): the weight segments are split at `` embedding:``; each piece is one token group (an embedding: one
  tensor entry per vector); a group that does not fit the chunk moves whole to the next one, unless it has 8 or more
  tokens (then it is split); end token, padding to 77; word ids number the groups from 1 (0: start, end, padding);
- ``ClipTokenWeightEncoder.encode_token_weights`` (l.28-79): the chunks are encoded as one batch, with the empty
  prompt's tokens (``gen_empty_tokens``, l.15) when a weight is not 1, and ``z = (z - z_empty) * w + z_empty`` at each
  weighted position; the pooled output is the first chunk's;
- ``SDClipModel`` (l.81-297): ``process_tokens`` (l.170: embedding vectors take their token's row), then the text
  model's last layer, or with ``layer="hidden"`` the hidden state ``layer_idx`` (with the final LayerNorm unless
  ``layer_norm_hidden_state=False``); ``set_clip_options``/``reset_clip_options`` (l.152-168). Its ``transformer``
  holds the text model in ``text_model`` as ``comfy.clip_model.CLIPTextModel`` does (comfy/clip_model.py 158-162), so
  the weights have ComfyUI's names (``clip_l.transformer.text_model.encoder.layers.0…``); here a transformers CLIP;
- ``SD1Tokenizer`` (l.650) and ``SD1ClipModel`` (l.677): one stream, ``l``, held in ``clip_l``.
"""

from __future__ import annotations

import os
import re

import torch


def parse_parentheses(string):
    result, current, depth = [], "", 0
    for char in string:
        if char == "(":
            if depth == 0:
                if current:
                    result.append(current)
                current = "("
            else:
                current += char
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                result.append(current + ")")
                current = ""
            else:
                current += char
        else:
            current += char
    if current:
        result.append(current)
    return result


def token_weights(string, current_weight):
    out = []
    for part in parse_parentheses(string):
        weight = current_weight
        if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
            part = part[1:-1]
            colon = part.rfind(":")
            weight *= 1.1
            if colon > 0:
                try:
                    weight = float(part[colon + 1 :])
                    part = part[:colon]
                except ValueError:
                    pass
            out += token_weights(part, weight)
        else:
            out.append((part, current_weight))
    return out


def escape_important(text):
    return text.replace("\\)", "\0\1").replace("\\(", "\0\2")


def unescape_important(text):
    return text.replace("\0\1", ")").replace("\0\2", "(")


def load_embed(embedding_name, embedding_directory, embedding_size, embed_key=None):
    if isinstance(embedding_directory, str):
        embedding_directory = [embedding_directory]
    found = None
    for folder in embedding_directory:
        folder = os.path.abspath(folder)
        path = os.path.abspath(os.path.join(folder, embedding_name))
        if os.path.commonpath((folder, path)) != folder:
            continue
        candidates = [path] if os.path.isfile(path) else [path + ext for ext in (".safetensors", ".pt", ".bin")]
        found = next((c for c in candidates if os.path.isfile(c)), None)
        if found is not None:
            break
    if found is None:
        return None
    if found.lower().endswith(".safetensors"):
        import safetensors.torch

        embed = safetensors.torch.load_file(found, device="cpu")
    else:
        embed = torch.load(found, weights_only=True, map_location="cpu")
    if "string_to_param" in embed:
        return next(iter(embed["string_to_param"].values()))
    if embed_key is not None and embed_key in embed:
        return embed[embed_key]
    return next(iter(embed.values()))


def gen_empty_tokens(special_tokens, length):
    output = [special_tokens[name] for name in ("start", "end") if special_tokens.get(name) is not None]
    return output + [special_tokens["pad"]] * (length - len(output))


class ClipTokenWeightEncoder:
    special_tokens: dict

    def encode(self, tokens):
        raise NotImplementedError

    def encode_token_weights(self, token_weight_pairs):
        to_encode = [[token for token, _ in chunk] for chunk in token_weight_pairs]
        max_token_len = max((len(tokens) for tokens in to_encode), default=0)
        has_weights = any(weight != 1.0 for chunk in token_weight_pairs for _, weight in chunk)
        sections = len(to_encode)
        if has_weights or sections == 0:
            to_encode.append(gen_empty_tokens(self.special_tokens, max_token_len))
        out, pooled = self.encode(to_encode)
        first_pooled = pooled[0:1] if pooled is not None else None
        output = []
        for k in range(sections):
            z = out[k : k + 1]
            if has_weights:
                z_empty = out[-1]
                for j, (_, weight) in enumerate(token_weight_pairs[k]):
                    if weight != 1.0:
                        z[0][j] = (z[0][j] - z_empty[j]) * weight + z_empty[j]
            output.append(z)
        if not output:
            return out[-1:], first_pooled
        return torch.cat(output, dim=-2), first_pooled


class SDClipModel(torch.nn.Module, ClipTokenWeightEncoder):
    def __init__(self, text_model, special_tokens=None, layer="last", layer_idx=None, layer_norm_hidden_state=True):
        super().__init__()
        self.transformer = torch.nn.Module()
        self.transformer.text_model = text_model
        self.special_tokens = special_tokens or {"start": 49406, "end": 49407, "pad": 49407}
        self.layer_norm_hidden_state = layer_norm_hidden_state
        self.layer, self.layer_idx = "last", None
        if layer == "hidden":
            self.set_clip_options({"layer": layer_idx})
        self.options_default = (self.layer, self.layer_idx)

    def set_clip_options(self, options):
        layer_idx = options.get("layer", self.layer_idx)
        if layer_idx is None or abs(layer_idx) > self.transformer.text_model.config.num_hidden_layers:
            self.layer = "last"
        else:
            self.layer, self.layer_idx = "hidden", layer_idx

    def reset_clip_options(self):
        self.layer, self.layer_idx = self.options_default

    def process_tokens(self, tokens):
        """Token ids (0 where an embedding vector goes) and the vectors: ``(chunk, row, vector)``."""
        ids, vectors = [], []
        for b, chunk in enumerate(tokens):
            row_ids = []
            for row, token in enumerate(chunk):
                if torch.is_tensor(token):
                    vectors.append((b, row, token))
                    row_ids.append(0)
                else:
                    row_ids.append(int(token))
            ids.append(row_ids)
        return torch.tensor(ids), vectors

    def forward(self, tokens):
        ids, vectors = self.process_tokens(tokens)

        def insert(module, inputs, output):
            output = output.clone()
            for b, row, vector in vectors:
                output[b, row] = vector.to(output)
            return output

        model = self.transformer.text_model
        handle = model.get_input_embeddings().register_forward_hook(insert)
        try:
            out = model(input_ids=ids, output_hidden_states=self.layer != "last")
        finally:
            handle.remove()
        if self.layer == "last":
            z = out.last_hidden_state
        else:
            z = out.hidden_states[self.layer_idx]
            if self.layer_norm_hidden_state:
                z = model.final_layer_norm(z)
        return z.float(), out.pooler_output.float()

    def encode(self, tokens):
        return self(tokens)


class SDTokenizer:
    """The real one loads its transformers ``CLIPTokenizer`` from ``comfy/sd1_tokenizer``; here it is given."""

    def __init__(self, tokenizer, embedding_directory=None, embedding_size=768, embedding_key="clip_l", pad_with_end=True):
        self.tokenizer = tokenizer
        self.max_length = 77
        self.min_length = None
        self.min_padding = None
        self.pad_left = False
        empty = self.tokenizer("")["input_ids"]
        self.tokenizer_adds_end_token = True
        self.tokens_start = 1
        self.start_token, self.end_token = empty[0], empty[1]
        self.pad_token = self.end_token if pad_with_end else 0
        self.pad_with_end = pad_with_end
        self.pad_to_max_length = True
        self.embedding_directory = embedding_directory
        self.max_word_length = 8
        self.embedding_identifier = "embedding:"
        self.embedding_size = embedding_size
        self.embedding_key = embedding_key

    def _try_get_embedding(self, embedding_name):
        words = embedding_name.split()
        name, leftover = words[0], " ".join(words[1:])
        embed = load_embed(name, self.embedding_directory, self.embedding_size, self.embedding_key)
        if embed is None:
            stripped = name.strip(",")
            if len(stripped) < len(name):
                embed = load_embed(stripped, self.embedding_directory, self.embedding_size, self.embedding_key)
                return embed, f"{name[len(stripped) :]} {leftover}"
        return embed, leftover

    def tokenize_with_weights(self, text, return_word_ids=False, tokenizer_options={}, **kwargs):  # noqa: B006
        identifier = self.embedding_identifier
        groups = []
        for segment, weight in token_weights(escape_important(text), 1.0):
            pieces = re.split(f" {identifier}|\n{identifier}", unescape_important(segment))
            pieces = [pieces[0]] + [identifier + piece for piece in pieces[1:]]
            for word in [piece for piece in pieces if piece != ""]:
                if word.startswith(identifier) and self.embedding_directory is not None:
                    embed, leftover = self._try_get_embedding(word[len(identifier) :].strip("\n"))
                    if embed is not None:
                        rows = [embed] if embed.ndim == 1 else list(embed)
                        groups.append([(row, weight) for row in rows])
                    if leftover == "":
                        continue
                    word = leftover
                groups.append([(t, weight) for t in self.tokenizer(word)["input_ids"][self.tokens_start : -1]])

        batch = [(self.start_token, 1.0, 0)]
        batched = [batch]
        for i, group in enumerate(groups):
            is_large = len(group) >= self.max_word_length
            while group:
                if len(group) + len(batch) > self.max_length - 1:
                    remaining = self.max_length - len(batch) - 1
                    if is_large:
                        batch.extend((t, w, i + 1) for t, w in group[:remaining])
                        batch.append((self.end_token, 1.0, 0))
                        group = group[remaining:]
                    else:
                        batch.append((self.end_token, 1.0, 0))
                        batch.extend([(self.pad_token, 1.0, 0)] * remaining)
                    batch = [(self.start_token, 1.0, 0)]
                    batched.append(batch)
                else:
                    batch.extend((t, w, i + 1) for t, w in group)
                    group = []
        batch.append((self.end_token, 1.0, 0))
        batch.extend([(self.pad_token, 1.0, 0)] * (self.max_length - len(batch)))
        if not return_word_ids:
            return [[(t, w) for t, w, _ in chunk] for chunk in batched]
        return batched


class SD1Tokenizer:
    """``embedding_size``: the real one's is CLIP-L's, 768; the tests' text models are smaller."""

    def __init__(self, tokenizer, embedding_directory=None, clip_name="l", embedding_size=768):
        self.clip_name = clip_name
        self.clip = f"clip_{clip_name}"
        setattr(self, self.clip, SDTokenizer(tokenizer, embedding_directory, embedding_size))

    def tokenize_with_weights(self, text, return_word_ids=False, **kwargs):
        return {self.clip_name: getattr(self, self.clip).tokenize_with_weights(text, return_word_ids, **kwargs)}


class SD1ClipModel(torch.nn.Module):
    def __init__(self, clip_l, clip_name="l"):
        super().__init__()
        self.clip_name = clip_name
        self.clip = f"clip_{clip_name}"
        setattr(self, self.clip, clip_l)

    def set_clip_options(self, options):
        getattr(self, self.clip).set_clip_options(options)

    def reset_clip_options(self):
        getattr(self, self.clip).reset_clip_options()

    def encode_token_weights(self, token_weight_pairs):
        return getattr(self, self.clip).encode_token_weights(token_weight_pairs[self.clip_name])
