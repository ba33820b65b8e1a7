// Hover hints for the AlignIT accordion (the WebUI's hints.js reads the global `titles` table).
(function () {
    if (typeof titles === "undefined") return;
    Object.assign(titles, {
        "Enable AlignIT": "Take the concept from its embedding and everything else in the prompt from the base model (arXiv 2406.18893).",
        "Class word": "What the concept is (cat, woman, backpack). The base model conditions on this word; AlignIT swaps in the concept's own rows.",
        "Embedding (empty: the trigger's own name)": "The textual-inversion embedding that carries the concept. Leave empty when the trigger is the embedding's name.",
        "Strength": "1 uses the concept rows as they are; lower values blend them towards the class word.",
        "From step (fraction)": "AlignIT starts at this fraction of the sampling steps.",
        "To step (fraction)": "AlignIT stops at this fraction of the sampling steps.",
        "Placeholder word": "The neutral one-token word that stands for every other token of the dummy prompt.",
    });
})();
