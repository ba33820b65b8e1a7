// The AlignIT accordion as a person sees it, in a real WebUI started with its UI (tools/ui_serve.py), in headless
// Chromium at 1600x1200: collapsed, open (row heights, label lines, the trigger's placeholder, the hint of every
// control), the first source list on first open, Suggest filling the class word, infotext paste (readable and 0.1's
// JSON). Screenshots and report.json go to OUTDIR.
//     node tools/ui_check.mjs URL a1111|forge light|dark OUTDIR        (playwright-core from npm, Debian's chromium)
import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const [url, kind, theme, out] = process.argv.slice(2);
fs.mkdirSync(out, { recursive: true });
const report = { kind, theme };
const browser = await chromium.launchPersistentContext(fs.mkdtempSync(path.join(os.tmpdir(), "alignit-ui-")), {
    executablePath: "/usr/bin/chromium",
    viewport: { width: 1600, height: 1200 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"],
});
const page = browser.pages()[0] || await browser.newPage();
page.setDefaultTimeout(120000);
const consoleErrors = [];
page.on("console", (m) => { if (m.type() === "error") consoleErrors.push(m.text()); });
await page.goto(`${url}/?__theme=${theme}`);
const acc = page.locator("#alignit_txt2img");
await acc.waitFor();
await page.waitForTimeout(3000);
await acc.scrollIntoViewIfNeeded();
await acc.screenshot({ path: `${out}/collapsed.png` });
await acc.locator(".label-wrap").first().click();
await page.locator("#alignit_txt2img_trigger_0").waitFor({ state: "visible" });
await page.waitForTimeout(1500);
await acc.screenshot({ path: `${out}/open.png` });

const box = async (sel) => (await page.locator(sel).boundingBox());
const rowBox = async (i) => page.locator(`#alignit_txt2img_trigger_${i}`).evaluate((e) => {
    const r = e.parentElement.getBoundingClientRect(); return { y: r.y, height: r.height, width: r.width };
});
report.rows = [await rowBox(0), await rowBox(1), await rowBox(2)];
report.labels = {};
for (const name of ["trigger_0", "class_0", "source_0", "strength_0", "start", "end", "placeholder", "lora_scope"]) {
    report.labels[name] = await page.locator(`#alignit_txt2img_${name}`).evaluate((e) => {
        const label = e.querySelector("span[data-testid='block-info'], label span, .block-info, span");
        const r = label ? label.getBoundingClientRect() : null;
        const lh = label ? parseFloat(getComputedStyle(label).lineHeight) || 20 : 0;
        return label ? { text: label.textContent.trim(), height: r.height, lines: Math.round(r.height / lh) } : null;
    });
}
const trig = page.locator("#alignit_txt2img_trigger_0").locator("textarea, input").first();
report.triggerPlaceholder = await trig.evaluate((e) => ({ placeholder: e.placeholder, fits: e.scrollWidth <= e.clientWidth, width: e.clientWidth }));
// the placeholder text's width against the field's
report.triggerPlaceholder.textWidth = await trig.evaluate((e) => {
    const c = document.createElement("canvas").getContext("2d"); c.font = getComputedStyle(e).font; return c.measureText(e.placeholder).width;
});

// hints on every control
await page.waitForTimeout(1500);
report.hints = {};
const hintOf = async (sel) => page.locator(sel).first().evaluate((e) => {
    let n = e; while (n && !n.title) n = n.parentElement; return n ? n.title.slice(0, 40) : null;
});
for (const [name, sel] of Object.entries({
    enabled: "#alignit_txt2img_enabled input", trigger: "#alignit_txt2img_trigger_0 textarea, #alignit_txt2img_trigger_0 input",
    class: "#alignit_txt2img_class_0 textarea, #alignit_txt2img_class_0 input", suggest: "#alignit_txt2img_suggest_0",
    source: "#alignit_txt2img_source_0 input", strength: "#alignit_txt2img_strength_0 input[type=range]",
    start: "#alignit_txt2img_start input[type=number]", placeholder: "#alignit_txt2img_placeholder textarea, #alignit_txt2img_placeholder input",
    lora_scope: "#alignit_txt2img_lora_scope input", refresh: "#alignit_txt2img_refresh",
    maps_on: "#alignit_txt2img_maps_on input", maps_compare: "#alignit_txt2img_maps_compare input",
    maps_words: "#alignit_txt2img_maps_words textarea, #alignit_txt2img_maps_words input",
})) report.hints[name] = await hintOf(sel);

// the source list on first open
const source = page.locator("#alignit_txt2img_source_0 input").first();
report.sourceValue = await source.inputValue();
// after the page's own refresh of the lists, every source field still holds what it held (nothing)
report.sourceValuesAfterLoad = [];
for (let i = 0; i < 3; i++) report.sourceValuesAfterLoad.push(await page.locator(`#alignit_txt2img_source_${i} input`).first().inputValue());
const opened = Date.now();
await source.click();
const options = page.locator("#alignit_txt2img_source_0 ul.options li, ul.options li");
// the list is read again when it opens: wait (at most 20 s) until it holds the test embedding
for (let i = 0; i < 40; i++) {
    report.sourceOptions = (await options.allTextContents()).map((t) => t.replace(/^✓\s*/, "").trim());
    if (report.sourceOptions.includes("alignit_test_sks")) break;
    await page.waitForTimeout(500);
}
report.sourceListSeconds = (Date.now() - opened) / 1000;
await acc.screenshot({ path: `${out}/source_list.png` });
await page.keyboard.press("Escape");
await page.locator("#alignit_txt2img_enabled input").click();  // move focus away

// fill a row and suggest
await page.locator("#alignit_txt2img_enabled input").check();
await trig.fill("alignit_test_sks");
await source.click();
await page.locator("ul.options li", { hasText: "alignit_test_sks" }).first().click();
await page.locator("#alignit_txt2img_trigger_1").locator("textarea, input").first().fill("ohwx");
await page.locator("#alignit_txt2img_class_1").locator("textarea, input").first().fill("man");
const t0 = Date.now();
await page.locator("#alignit_txt2img_suggest_0").click();
// the row shows its five buttons at once (empty while ranking): wait for the first word
await page.waitForFunction(() => {
    const b = document.querySelector("#alignit_txt2img_suggestion_0_0");
    return b && b.textContent.trim() !== "";
}, null, { timeout: 600000 });
report.suggestSeconds = (Date.now() - t0) / 1000;
report.suggestions = await page.locator("[id^='alignit_txt2img_suggestion_0_']").allTextContents();
await page.waitForTimeout(800);
await acc.screenshot({ path: `${out}/suggested.png` });
await page.locator("#alignit_txt2img_suggestion_0_0").click();
await page.waitForTimeout(1500);
report.classAfterClick = await page.locator("#alignit_txt2img_class_0").locator("textarea, input").first().inputValue();
await acc.screenshot({ path: `${out}/filled.png` });
// infotext paste: the readable format, then AlignIT 0.1's JSON
const fields = async () => ({
    enabled: await page.locator("#alignit_txt2img_enabled input").isChecked(),
    trigger: await page.locator("#alignit_txt2img_trigger_0").locator("textarea, input").first().inputValue(),
    classWord: await page.locator("#alignit_txt2img_class_0").locator("textarea, input").first().inputValue(),
    source: await page.locator("#alignit_txt2img_source_0 input").first().inputValue(),
    strength: await page.locator("#alignit_txt2img_strength_0 input[type=number]").first().inputValue(),
    start: await page.locator("#alignit_txt2img_start input[type=number]").first().inputValue(),
    end: await page.locator("#alignit_txt2img_end input[type=number]").first().inputValue(),
    trigger1: await page.locator("#alignit_txt2img_trigger_1").locator("textarea, input").first().inputValue(),
});
const prompt = page.locator("#txt2img_prompt textarea").first();
const base = "a alignit_test_sks playing badminton\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 7, Size: 64x64, ";
report.paste = {};
for (const [name, tail] of Object.entries({
    readable: 'AlignIT 1: "alignit_test_sks → cat, source: alignit_test_sks, strength: 0.8", AlignIT steps: 0.1-0.9',
    v01: 'AlignIT: "[[\\"<sks>\\", \\"dog\\", \\"alignit_test_sks\\", 0.5]]"',
    none: "Model hash: 458edde9d3",
})) {
    await prompt.fill(base + tail);
    await page.locator("#paste").first().click();
    await page.waitForTimeout(3000);
    report.paste[name] = await fields();
}
await acc.screenshot({ path: `${out}/pasted.png` });

// the attention maps in the gallery: a small generation (the pasted Steps: 2, Size: 64x64) with AlignIT and the maps
await prompt.fill(base + 'AlignIT 1: "alignit_test_sks → cat, source: alignit_test_sks"');
await page.locator("#paste").first().click();
await page.waitForTimeout(3000);
await page.locator("#alignit_txt2img_maps_on input").check();
const generated = Date.now();
await page.locator("#txt2img_generate").click();
await page.waitForFunction(() => document.querySelectorAll("#txt2img_gallery img").length >= 2, null, { timeout: 900000 });
await page.waitForTimeout(2000);
report.mapsSeconds = (Date.now() - generated) / 1000;
report.galleryImages = await page.locator("#txt2img_gallery img").count();
await page.locator("#txt2img_gallery").screenshot({ path: `${out}/maps_gallery.png` });
await page.locator("#alignit_txt2img_maps_on input").uncheck();
report.consoleErrors = consoleErrors;
fs.writeFileSync(`${out}/report.json`, JSON.stringify(report, null, 2));
console.log(JSON.stringify(report, null, 2));
await browser.close();
