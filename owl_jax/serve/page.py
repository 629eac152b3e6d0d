"""The chat page served at `GET /`: plain HTML and JavaScript, no external resources.

The page keeps the conversation in memory and posts all of it with every question:
`{"messages": [...], "stream": true, "temperature": T}` plus `"max_tokens": N` when the options set one.
T comes from `#temperature` (default 0: greedy, so answers are reproducible); each user message is
`[{"type": "image_url", "image_url": {"url": <data URL of the picked file>}}, {"type": "text", ...}]`,
with a `{"type": "video_url", "video_url": {"url": ...}}` part after the image when a video was picked.
The video picker is shown only when `/v1/models` lists "video" in the model's `input_modalities` (a
video-layout checkpoint). The answer streams into a `.assistant` bubble, which gets `data-done="true"`
when the stream ends (and class `error` if it failed). Element ids used by tests: `image`, `video`,
`video-picker`, `question`, `send`, `messages`.
"""

INDEX_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mPLUG-Owl chat</title>
<style>
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; background: #f4f5f7; color: #1d1f23;
         display: flex; flex-direction: column; height: 100vh; }
  header { display: flex; align-items: center; gap: 12px; padding: 10px 16px; background: #fff;
           border-bottom: 1px solid #dde0e4; }
  header h1 { font-size: 17px; margin: 0; }
  #model { color: #667; font-size: 13px; flex: 1; }
  #messages { flex: 1; overflow-y: auto; padding: 16px; display: flex; flex-direction: column; gap: 10px; }
  .bubble { max-width: 75%; padding: 8px 12px; border-radius: 12px; white-space: pre-wrap;
            overflow-wrap: anywhere; }
  .user { align-self: flex-end; background: #2f6fde; color: #fff; }
  .user img, .user video { display: block; max-width: 220px; max-height: 220px; border-radius: 8px;
                           margin-bottom: 6px; }
  .user.failed { opacity: .55; }
  .assistant { align-self: flex-start; background: #fff; border: 1px solid #dde0e4; min-height: 2.2em; }
  .assistant:not([data-done]) { border-style: dashed; }
  .assistant.error { border-color: #d33; color: #a11; }
  #error { margin: 0 16px; padding: 8px 12px; background: #fde8e8; color: #a11; border-radius: 8px; }
  form { display: grid; grid-template-columns: 1fr auto; gap: 8px; padding: 12px 16px; background: #fff;
         border-top: 1px solid #dde0e4; }
  #question { grid-column: 1; resize: vertical; font: inherit; padding: 8px; min-height: 3em; }
  #send { grid-column: 2; font: inherit; padding: 0 22px; }
  .row { grid-column: 1 / 3; display: flex; flex-wrap: wrap; align-items: center; gap: 12px; font-size: 13px; }
  .row input[type=number] { width: 6em; }
  #preview-box { position: relative; }
  #preview { max-height: 64px; max-width: 120px; border-radius: 6px; vertical-align: middle; }
</style>
</head>
<body>
<header>
  <h1>mPLUG-Owl</h1><span id="model"></span>
  <button id="reset" type="button" title="Forget the conversation">New chat</button>
</header>
<main id="messages" aria-live="polite"></main>
<div id="error" role="alert" hidden></div>
<form id="composer">
  <div class="row">
    <label>Image <input id="image" type="file" accept="image/*"></label>
    <span id="preview-box" hidden><img id="preview" alt="image for the next question">
      <button id="clear-image" type="button" title="Remove the image">&times;</button></span>
    <label id="video-picker" hidden>Video <input id="video" type="file" accept="video/*"></label>
    <span id="video-box" hidden><span id="video-name"></span>
      <button id="clear-video" type="button" title="Remove the video">&times;</button></span>
    <label>Temperature <input id="temperature" type="number" min="0" max="2" step="0.1" value="0"></label>
    <label>Max tokens <input id="max-tokens" type="number" min="1" placeholder="default"></label>
  </div>
  <textarea id="question" rows="2" placeholder="Ask about the image (Enter sends, Shift+Enter: new line)"></textarea>
  <button id="send" type="submit">Send</button>
</form>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const conversation = [];               // the OpenAI messages of the conversation so far
let imageReady = Promise.resolve(null); // data URL of the image picked for the next question (or null)
let videoReady = Promise.resolve(null); // data URL of the video picked for the next question (or null)
let busy = false;

function showError(message) { $("error").textContent = message; $("error").hidden = false; }
function hideError() { $("error").hidden = true; $("error").textContent = ""; }

function clearImage() {
  imageReady = Promise.resolve(null);
  $("image").value = "";
  $("preview").removeAttribute("src");
  $("preview-box").hidden = true;
}

function clearVideo() {
  videoReady = Promise.resolve(null);
  $("video").value = "";
  $("video-name").textContent = "";
  $("video-box").hidden = true;
}

// A data URL of the file; sending waits on this promise, so a click right after picking still sends it.
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error("could not read " + file.name));
    reader.readAsDataURL(file);
  });
}

$("image").addEventListener("change", () => {
  const file = $("image").files[0];
  if (!file) { clearImage(); return; }
  imageReady = readFile(file);
  imageReady.then((url) => { $("preview").src = url; $("preview-box").hidden = false; },
                  (e) => { showError(e.message); clearImage(); });
});
$("clear-image").addEventListener("click", clearImage);
$("video").addEventListener("change", () => {
  const file = $("video").files[0];
  if (!file) { clearVideo(); return; }
  videoReady = readFile(file);
  videoReady.then(() => { $("video-name").textContent = file.name; $("video-box").hidden = false; },
                  (e) => { showError(e.message); clearVideo(); });
});
$("clear-video").addEventListener("click", clearVideo);

function addBubble(role, text, image, video) {
  const bubble = document.createElement("div");
  bubble.className = "bubble " + role;
  if (image) { const img = document.createElement("img"); img.src = image; img.alt = "sent image"; bubble.append(img); }
  if (video) {
    const clip = document.createElement("video");
    clip.src = video; clip.muted = true; clip.controls = true;
    bubble.append(clip);
  }
  if (text) bubble.append(document.createTextNode(text));
  $("messages").append(bubble);
  bubble.scrollIntoView({block: "end"});
  return bubble;
}

async function errorMessage(response) {
  try { const body = await response.json(); if (body.error && body.error.message) return body.error.message; }
  catch (e) { /* not JSON: fall through */ }
  return "the server answered " + response.status + " " + response.statusText;
}

// Reads `data: ...` events from a text/event-stream response; calls onText per piece, returns the answer.
async function readStream(response, onText) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", answer = "", finished = false;
  for (;;) {
    const {value, done} = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(0), {stream: !done});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") { finished = true; continue; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = (chunk.choices || [])[0];
        const piece = choice && choice.delta && choice.delta.content;
        if (piece) { answer += piece; onText(piece); }
      }
    }
    if (done) break;
  }
  if (!finished) throw new Error("the answer stream ended early");
  return answer;
}

async function send(event) {
  if (event) event.preventDefault();
  if (busy) return;
  const text = $("question").value.trim();
  let image, video;
  try { [image, video] = await Promise.all([imageReady, videoReady]); } catch (e) { return; }
  if (!text && !image && !video) { showError("Type a question or pick an image first."); return; }
  hideError();
  busy = true;
  $("send").disabled = true;
  const content = [];
  if (image) content.push({type: "image_url", image_url: {url: image}});
  if (video) content.push({type: "video_url", video_url: {url: video}});
  if (text) content.push({type: "text", text: text});
  conversation.push({role: "user", content: content});
  const userBubble = addBubble("user", text, image, video);
  $("question").value = "";
  clearImage();
  clearVideo();
  const bubble = addBubble("assistant", "");
  try {
    const body = {messages: conversation, stream: true, temperature: Number($("temperature").value) || 0};
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    if (!response.ok) throw new Error(await errorMessage(response));
    const answer = await readStream(response, (piece) => {
      bubble.append(document.createTextNode(piece));
      bubble.scrollIntoView({block: "end"});
    });
    conversation.push({role: "assistant", content: answer});
  } catch (e) {
    conversation.pop();  // unanswered: leave it out of the next request
    userBubble.classList.add("failed");
    bubble.classList.add("error");
    if (!bubble.textContent) bubble.textContent = "(no answer)";
    showError("Error: " + e.message);
  } finally {
    bubble.dataset.done = "true";
    busy = false;
    $("send").disabled = false;
  }
}

$("composer").addEventListener("submit", send);
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); send(); }
});
$("reset").addEventListener("click", () => {
  if (busy) return;
  conversation.length = 0;
  $("messages").replaceChildren();
  hideError();
});
fetch("/v1/models").then((r) => r.json()).then((list) => {
  if (list.data && list.data[0]) {
    $("model").textContent = list.data[0].id;
    $("video-picker").hidden = !(list.data[0].input_modalities || []).includes("video");
  }
}).catch(() => {});
</script>
</body>
</html>
"""
