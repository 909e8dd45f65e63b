// Drives the playground page in a real headless Chromium over the DevTools protocol:
// generates one image, reads its seed off the page, saves a screenshot, then starts a
// long job and cancels it. CI runs it through tests/clients/run.sh; by hand:
//
//   cargo run -- serve --bind 127.0.0.1:18087 &
//   chromium --headless --no-sandbox --disable-gpu --disable-background-networking \
//       --remote-debugging-port=9333 --window-size=1100,800 about:blank &
//   node --experimental-websocket tools/playground_browser_check.mjs \
//       http://127.0.0.1:18087/ http://127.0.0.1:9333 /tmp/playground
//
// Exits non-zero when a step fails.

import { writeFileSync } from "node:fs";

const [pageUrl, devtools, outPrefix] = process.argv.slice(2);
if (!pageUrl || !devtools || !outPrefix) {
  console.error("usage: playground_browser_check.mjs PAGE_URL DEVTOOLS_URL OUT_PREFIX");
  process.exit(2);
}

const targets = await (await fetch(devtools + "/json")).json();
const page = targets.find((t) => t.type === "page");
const socket = new WebSocket(page.webSocketDebuggerUrl);
await new Promise((resolve, reject) => {
  socket.onopen = resolve;
  socket.onerror = reject;
});
let nextId = 1;
const pending = new Map();
socket.onmessage = (message) => {
  const data = JSON.parse(message.data);
  if (data.id && pending.has(data.id)) {
    pending.get(data.id)(data);
    pending.delete(data.id);
  }
};
function send(method, params = {}) {
  const id = nextId++;
  socket.send(JSON.stringify({ id, method, params }));
  return new Promise((resolve) => pending.set(id, resolve));
}
async function evaluate(expression) {
  const reply = await send("Runtime.evaluate", { expression, returnByValue: true, awaitPromise: true });
  if (reply.result.exceptionDetails) throw new Error(JSON.stringify(reply.result.exceptionDetails));
  return reply.result.result.value;
}
async function waitFor(expression, what, seconds = 60) {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    const value = await evaluate(expression);
    if (value) return value;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error("timed out waiting for " + what + "; status: " + (await evaluate("document.getElementById('status').textContent")));
}
async function screenshot(path) {
  const shot = await send("Page.captureScreenshot", { format: "png" });
  writeFileSync(path, Buffer.from(shot.result.data, "base64"));
  console.log("screenshot:", path);
}

await send("Page.enable");
await send("Page.navigate", { url: pageUrl });
await waitFor("document.getElementById('sampler') && document.getElementById('sampler').options.length > 0", "the sampler list");
const models = await evaluate("[...document.getElementById('model').options].map(o => o.value)");
console.log("models:", models);

// One image, read its seed off the page.
await evaluate(`(() => {
  const set = (id, v) => { document.getElementById(id).value = v; };
  set('prompt', 'a lighthouse at dusk'); set('steps', '4'); set('seed', '42');
  set('width', '64'); set('height', '64'); set('n', '1');
  document.getElementById('generate').click();
})()`);
const seed = await waitFor("(document.querySelector('figcaption.seed') || {}).textContent", "the image");
console.log("caption:", seed);
if (seed !== "Seed 42") throw new Error("expected 'Seed 42', got " + seed);
await screenshot(outPrefix + "-generated.png");

// A long job, cancelled while it runs.
await evaluate(`(() => {
  document.getElementById('steps').value = '150';
  document.getElementById('n').value = '4';
  document.getElementById('width').value = '128';
  document.getElementById('height').value = '128';
  document.getElementById('generate').click();
})()`);
await waitFor("document.getElementById('status').textContent.startsWith('Step')", "progress");
await evaluate("document.getElementById('cancel').click()");
const status = await waitFor("document.getElementById('status').textContent === 'Cancelled.' && 'Cancelled.'", "the cancellation");
console.log("status:", status);
await screenshot(outPrefix + "-cancelled.png");
socket.close();
console.log("playground check passed");
