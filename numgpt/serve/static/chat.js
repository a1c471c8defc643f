// numgpt playground, "Chat": POST /v1/chat/completions streamed as server-sent events, the
// reply's tokens shaded by probability like the Generate card's. Loaded after playground.js
// and built on its helpers ($, call, events, clearError, showError, visible, percent,
// shadeLevel, numberOr, state). The conversation lives in this page only; the server
// renders it with the model's chat template on every request.
"use strict";

const chatState = { messages: [], controller: null, steps: [] };

function chatRequest() {
  const body = {
    messages: chatState.messages,
    max_tokens: numberOr("chat-max-tokens", 64, (s) => parseInt(s, 10)),
    temperature: numberOr("chat-temperature", 0, parseFloat),
    logprobs: true, top_logprobs: 5, stream: true,
  };
  if (state.model) body.model = state.model;
  return body;
}

function chatBubble(role, text) {
  const box = document.createElement("div");
  box.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role;
  const body = document.createElement("div");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  $("chat-log").appendChild(box);
  return body;
}

function chatToken(into, text, entry) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (entry) {
    const p = Math.exp(entry.logprob);
    const alts = (entry.top_logprobs || []).map((a) => `${visible(a.token)} ${percent(Math.exp(a.logprob))}`);
    span.dataset.p = String(p);
    span.dataset.level = String(shadeLevel(p));
    span.dataset.chatStep = String(chatState.steps.length);
    span.setAttribute("aria-label", `${visible(entry.token)}, probability ${percent(p)}`);
    span.title = `“${visible(entry.token)}”: ${percent(p)}\n` + alts.join("\n");
    chatState.steps.push(entry);
  }
  into.appendChild(span);
}

async function chatSend() {
  const text = $("chat-input").value;
  if (chatState.controller || !text.trim()) return;
  clearError();
  chatState.messages.push({ role: "user", content: text });
  chatBubble("user", text);
  $("chat-input").value = "";
  const reply = chatBubble("assistant", "");
  const controller = new AbortController();
  chatState.controller = controller;
  $("chat-send").disabled = true;
  $("chat-status").textContent = "Replying…";
  let content = "", finish = null;
  try {
    const response = await call("POST", "/v1/chat/completions", chatRequest(), controller.signal);
    for await (const data of events(response)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      for (const c of chunk.choices || []) {
        const entries = (c.logprobs && c.logprobs.content) || [];
        if (entries.length) entries.forEach((e, i) => chatToken(reply, i ? "" : c.delta.content || "", e));
        else if (c.delta && c.delta.content) chatToken(reply, c.delta.content, null);
        if (c.delta && c.delta.content) content += c.delta.content;
        if (c.finish_reason) finish = c.finish_reason;
      }
    }
    chatState.messages.push({ role: "assistant", content });
    $("chat-status").textContent = `Done: ${chatState.steps.length} tokens in this conversation; finish reason: ${finish || "none"}.`;
  } catch (err) {
    chatState.messages.pop();  // the question goes unanswered: leave it out of the history
    $("chat-status").textContent = "Failed.";
    showError(err);
  } finally {
    chatState.controller = null;
    $("chat-send").disabled = false;
    document.body.dataset.chatted = String(Number(document.body.dataset.chatted || 0) + 1);
  }
}

function chatReset() {
  if (chatState.controller) chatState.controller.abort();
  chatState.messages = [];
  chatState.steps = [];
  $("chat-log").replaceChildren();
  $("chat-status").textContent = "New conversation.";
}

document.addEventListener("DOMContentLoaded", () => {
  $("chat-form").addEventListener("submit", (e) => { e.preventDefault(); chatSend(); });
  $("chat-reset").addEventListener("click", chatReset);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); chatSend(); }
  });
});
