// The web console in a real browser: `tessera serve` on the default pool,
// driven in headless Chromium (Debian's `chromium`) by playwright-core.
// Run by `make test` (target `console-test`); screenshots of every view are
// written to $CONSOLE_SHOTS for a person to look at.
//
// Environment: TESSERA_BIN (the built `tessera`), CONSOLE_DEPS (the
// node_modules holding playwright-core), CHROMIUM (the browser), and
// TESSERA_HOME as for every other test (the pool and modules of `make setup`).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import { mkdtempSync, mkdirSync, existsSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const repo = resolve(here, "..", "..");
const bin = process.env.TESSERA_BIN;
const deps = process.env.CONSOLE_DEPS;
const chromiumPath = process.env.CHROMIUM || "/usr/bin/chromium";
const home = process.env.TESSERA_HOME || join(process.env.HOME, ".cache", "tessera");
const shots = process.env.CONSOLE_SHOTS || join(home, "console-shots");
assert.ok(bin && existsSync(bin), "TESSERA_BIN must name the built tessera binary (run through `make test`)");
assert.ok(deps && existsSync(join(deps, "playwright-core")), "CONSOLE_DEPS must hold playwright-core (run through `make test`)");
const { chromium } = createRequire(join(deps, "noop.js"))("playwright-core");

const registry = mkdtempSync(join(tmpdir(), "tessera-console-"));
const env = { ...process.env, TESSERA_REGISTRY: registry };
let server;
let base;
let key;
let browser;

function addTenant(name, admin) {
  const out = execFileSync(bin, ["tenants", "add", name, ...(admin ? ["--admin"] : [])], { env, encoding: "utf8" });
  return out.trim().split("\n")[0].trim();
}

before(async () => {
  mkdirSync(shots, { recursive: true });
  key = addTenant("console-admin", true);
  server = spawn(bin, ["serve", "--port", "0", "--reports", join(repo, "docs", "results")], { env, stdio: ["ignore", "pipe", "inherit"] });
  base = await new Promise((ok, fail) => {
    let seen = "";
    const timer = setTimeout(() => fail(new Error("tessera serve did not start within 180 s: " + seen)), 180_000);
    server.stdout.on("data", (d) => {
      seen += d.toString();
      const m = seen.match(/listening on (http:\/\/[^\s]+)/);
      if (m) { clearTimeout(timer); ok(m[1]); }
    });
    server.on("exit", (code) => fail(new Error("tessera serve exited with " + code + ": " + seen)));
  });
  browser = await chromium.launch({ executablePath: chromiumPath, headless: true, args: ["--no-sandbox"] });
});

after(async () => {
  if (browser) await browser.close();
  if (server) server.kill("SIGTERM");
});

/// A page that records every console error and uncaught exception.
async function openPage(withKey) {
  const page = await browser.newPage({ viewport: { width: 1440, height: 1000 } });
  // The key as the page keeps it once typed, there before any script runs.
  if (withKey) await page.addInitScript((k) => sessionStorage.setItem("tessera-key", k), withKey);
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  return { page, errors };
}

async function useKey(page, k) {
  await page.fill("#key", k);
  await page.click("#key-form button[type=submit]");
}

test("the console asks two systems, streams both answers and shows the provenance", async () => {
  const { page, errors } = await openPage(key);
  await page.goto(base + "/ui/#compare", { waitUntil: "load" });
  await page.waitForSelector("#pick-members input[data-id='smollm2-135m-instruct']");
  await page.check("#pick-members input[data-id='smollm2-135m-instruct']");
  await page.check("#pick-systems input[data-id='majority-vote']");
  await page.fill("#question", "What is the capital of France? Answer with one word.");
  await page.fill("#max-tokens", "12");
  await page.click("#ask");
  await page.waitForFunction(() => {
    const s = [...document.querySelectorAll(".card .state")];
    return s.length === 2 && s.every((e) => e.classList.contains("done") || e.classList.contains("error"));
  }, null, { timeout: 240_000 });
  const cards = await page.$$eval(".card", (cs) => cs.map((c) => ({
    model: c.dataset.model,
    state: c.querySelector(".state").textContent,
    text: c.querySelector(".text").textContent,
    chunks: Number(c.dataset.chunks || 0),
    bars: c.querySelectorAll(".tl-bar").length,
    contributors: [...c.querySelectorAll(".contributors .badge")].map((b) => b.textContent),
    shaped: [...c.querySelectorAll(".share-row")].map((r) => ({ member: r.dataset.member, pct: r.querySelector(".share-pct").textContent })),
  })));
  await page.screenshot({ path: join(shots, "compare.png"), fullPage: true });
  assert.equal(cards.length, 2, JSON.stringify(cards));
  for (const c of cards) {
    assert.match(c.state, /^done/, JSON.stringify(c));
    assert.ok(c.text.trim().length > 0, "an answer: " + JSON.stringify(c));
  }
  const member = cards.find((c) => c.model === "smollm2-135m-instruct");
  const system = cards.find((c) => c.model === "majority-vote");
  // A member streams token by token; the system's answer arrives whole.
  assert.ok(member.chunks > 1, "the member's answer streamed in pieces: " + JSON.stringify(member));
  assert.equal(member.bars, 1, "one host call for a member alone");
  // majority-vote asks every generative member: one bar per call.
  assert.ok(system.bars >= 3, "the system's timeline shows its host calls: " + JSON.stringify(system));
  assert.ok(system.contributors.length >= 3, "its contributors are listed: " + JSON.stringify(system));
  // majority-vote answers with one member's sample: the host finds whose
  // words those are, all of them.
  assert.ok(system.shaped.length >= 1, "whose words reached the answer: " + JSON.stringify(system));
  assert.equal(system.shaped[0].pct, "100%", JSON.stringify(system));
  assert.ok(system.shaped.every((s) => system.contributors.includes(s.member)), JSON.stringify(system));
  assert.deepEqual(errors, [], "no console errors");
  await page.close();
});

test("the pool, modules and reports views list what the server has", async () => {
  const { page, errors } = await openPage(key);
  await page.goto(base + "/ui/", { waitUntil: "load" });
  await page.waitForSelector("#pick-members input");

  await page.click("button[data-view=pool]");
  await page.waitForSelector("#pool tr[data-member]");
  const members = await page.$$eval("#pool tr[data-member]", (rs) => rs.map((r) => r.dataset.member));
  for (const m of ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "gemma-3-270m"]) {
    assert.ok(members.includes(m), m + " in " + members);
  }
  await page.screenshot({ path: join(shots, "pool.png"), fullPage: true });

  // Publish a standard module's component under a new name from the page
  // (the registry refuses standard names), then remove it again.
  await page.click("button[data-view=modules]");
  await page.waitForSelector("#modules-standard tr");
  await page.click("#publish summary");
  await page.setInputFiles("#pub-wasm", join(home, "modules", "majority-vote.wasm"));
  const manifest = readFileSync(join(home, "modules", "majority-vote.toml"), "utf8").replace(/^name = ".*"$/m, 'name = "console-vote"');
  await page.setInputFiles("#pub-manifest", { name: "console-vote.toml", mimeType: "text/plain", buffer: Buffer.from(manifest) });
  await page.click("#publish-form button[type=submit]");
  await page.waitForSelector("#notice:not([hidden])", { timeout: 120_000 });
  const published = await page.textContent("#notice");
  assert.match(published, /^Published console-vote/, "the page says what happened: " + published);
  await page.waitForSelector("#modules-published tr[data-module='console-vote']");
  // Its budgets as granted and its quarantine state for this key.
  const row = await page.$eval("#modules-published tr[data-module='console-vote']", (r) => ({
    budgets: r.querySelector("td.budgets").textContent, quarantine: r.querySelector("td.quarantine").textContent,
  }));
  assert.match(row.budgets, /MiB/, JSON.stringify(row));
  assert.match(row.budgets, /calls/, JSON.stringify(row));
  assert.equal(row.quarantine, "runs", JSON.stringify(row));
  const std = await page.$eval("#modules-standard tr[data-system='majority-vote'] td.budgets", (c) => c.textContent);
  assert.match(std, /tokens/, "standard systems show their budgets too: " + std);
  await page.screenshot({ path: join(shots, "modules.png"), fullPage: true });
  page.once("dialog", (d) => d.accept());
  await page.click("#modules-published tr[data-module='console-vote'] button.danger");
  await page.waitForSelector("#modules-published tr[data-module='console-vote']", { state: "detached" });

  await page.click("button[data-view=reports]");
  await page.waitForSelector("#report-list a[data-report='headline']");
  await page.click("#report-list a[data-report='headline']");
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll("#report img.plot")];
    return imgs.length >= 3 && imgs.every((i) => i.complete && i.naturalWidth > 0);
  }, null, { timeout: 30_000 });
  const tables = await page.$$eval("#report table", (t) => t.length);
  assert.ok(tables >= 3, "the report's tables render: " + tables);
  await page.screenshot({ path: join(shots, "reports.png"), fullPage: false });
  assert.deepEqual(errors, [], "no console errors");
  await page.close();
});

test("a wrong key is refused with a message that says what to do", async () => {
  const { page } = await openPage(null);
  await page.goto(base + "/ui/", { waitUntil: "load" });
  await useKey(page, "not-a-key");
  await page.waitForSelector("#notice:not([hidden])");
  const message = await page.textContent("#notice");
  assert.match(message, /refused the key/);
  assert.match(message, /not valid/);
  // The key never travels in a URL.
  assert.ok(!page.url().includes("not-a-key"));
  await page.screenshot({ path: join(shots, "wrong-key.png") });
  await page.close();
});
