// AlignIT accordion: hover hints on every control (by element id, so no other label of the WebUI gets them), and the
// source lists read once the page has loaded (the WebUI loads embeddings after it builds the UI).
(function () {
    const hints = {
        enabled: "Take each concept from its embedding, LoRA or Custom Diffusion file and everything else in the prompt from the base model (AlignIT, arXiv 2406.18893).",
        trigger: "What you write in the prompt for the concept: a placeholder such as <sks>, an embedding's own name, a LoRA's trigger word, or a Custom Diffusion token with its word (<new1> cat).",
        class: "What the concept is (cat, woman, backpack): the base model conditions on this word, and AlignIT puts the concept's own rows in its place. Plain words only.",
        suggest: "Rank class words for this row's concept: how close each word's cross-attention keys are to the concept's. Click one of the five to use it.",
        suggestion: "Use this class word (the number: how close its keys are to the concept's, 1 at most).",
        source: "What carries the concept: an embedding, lora:NAME[:WEIGHT] from the LoRA list, or cd:NAME from the Custom Diffusion folder. Empty: the embedding named like the trigger. The list is read again when the accordion opens (on A1111 also whenever the list opens).",
        strength: "1: the concept as it is; 0: the plain class word; in between, a blend of the two (up to 2).",
        start: "AlignIT starts at this fraction of the sampling steps; before it, the plain class word.",
        end: "AlignIT stops at this fraction of the sampling steps; after it, the plain class word.",
        placeholder: "The neutral one-token word that stands for every other token of the concept's dummy prompt.",
        lora_scope: "kv: the UNet keeps its base weights and a concept's LoRA acts only on the concept's keys and values. full: the LoRA's UNet part applies to the whole image, every other token keeps base keys and values.",
        refresh: "Read the WebUI's embeddings, LoRA list and Custom Diffusion folder again for the Source lists.",
        maps_on: "After the images, heat maps of where each word of the prompt lands in the image (DAAM), one per word, with AlignIT on or off.",
        maps_compare: "Also render the same seed with AlignIT off and the trigger kept, and show its maps beside AlignIT's, one row per word.",
        maps_words: "The words to map, comma-separated. Empty: the concept and the prompt's other content words, at most 8.",
    };
    const id = /^alignit_(?:txt2img|img2img)_([a-z_]+?)(?:_\d+)*$/;

    function setHints() {
        for (const element of gradioApp().querySelectorAll("[id^='alignit_']")) {
            const match = id.exec(element.id);
            const hint = match && hints[match[1]];
            if (!hint) continue;
            // The block and what is in it: an input, a label or an option with an empty title would hide the block's.
            for (const node of [element, ...element.querySelectorAll("input, textarea, button, label, span, ul")]) {
                if (node.title !== hint) node.title = hint;
            }
        }
    }

    let timer = null;
    onUiUpdate(function () {
        clearTimeout(timer);
        timer = setTimeout(setHints, 300);
    });
    onUiLoaded(function () {
        setHints();
        for (const tab of ["txt2img", "img2img"]) {
            const refresh = () => gradioApp().getElementById(`alignit_${tab}_refresh`)?.click();
            refresh();
            // A click at page load can come before Gradio listens, and a list that is open does not redraw when its
            // choices change: read the sources again whenever the accordion is opened, before any list is.
            gradioApp().querySelector(`#alignit_${tab} .label-wrap`)?.addEventListener("click", refresh);
        }
    });
})();
