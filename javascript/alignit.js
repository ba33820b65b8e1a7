// Hover hints for the AlignIT accordion (the WebUI's hints.js reads the global `titles` table).
(function () {
    if (typeof titles === "undefined") return;
    Object.assign(titles, {
        "Enable AlignIT": "Take the concept from its embedding and everything else in the prompt from the base model (arXiv 2406.18893).",
        "Class word": "What the concept is (cat, woman, backpack). The base model conditions on this word; AlignIT swaps in the concept's own rows.",
        "Source: embedding, lora:NAME[:WEIGHT] or cd:NAME (empty: the trigger's name)": "What carries the concept: a textual-inversion embedding, a LoRA of the LoRA list, or a Custom Diffusion delta. Leave empty when the trigger is an embedding's name.",
        "LoRA scope (kv: on the concept's keys/values only; full: on the whole UNet)": "kv: the UNet keeps its base weights and the LoRA acts only on the concept. full: the LoRA's UNet part applies to the whole image, and every other token keeps base keys/values.",
        "Strength": "1 uses the concept rows as they are; lower values blend them towards the class word (up to 2).",
        "From step (fraction)": "AlignIT starts at this fraction of the sampling steps.",
        "To step (fraction)": "AlignIT stops at this fraction of the sampling steps.",
        "Placeholder word": "The neutral one-token word that stands for every other token of the dummy prompt.",
    });
})();
