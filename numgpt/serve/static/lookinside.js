// numgpt playground, "Logit lens and patching": POST /v1/inspect, drawn as tables.
// Loaded after playground.js and built on its helpers ($, call, clearError, showError,
// visible, percent, state). Every number shown is the server's, unchanged; each table keeps
// the values it drew in data-values (JSON) so a test can read them back.
"use strict";

const look = { data: null };

function lookRequest() {
  const view = $("look-view").value;
  const body = { view, prompt: $("look-prompt").value };
  if (state.model) body.model = state.model;
  if (view === "logit-lens") {
    if ($("look-target").value) body.target = $("look-target").value;
  } else {
    body.corrupted = $("look-corrupted").value;
    body.answer = $("look-answer").value;
    body.wrong = $("look-wrong").value;
  }
  return body;
}

function lookCell(value, text, title, signed) {
  const td = document.createElement("td");
  const v = Number(value);
  td.dataset.v = String(v);
  td.style.setProperty("--p", String(Math.min(1, Math.abs(v))));
  if (Math.abs(v) > 0.55) td.className = "strong";
  if (signed && v < 0) td.classList.add("negative");
  td.textContent = text;
  td.title = title;
  return td;
}

function lookTable(table, caption, columns, rows, values, cell) {
  // rows: labels; values: (rows, columns) numbers; cell(i, j) -> <td>
  table.replaceChildren();
  table.dataset.values = JSON.stringify(values);
  table.classList.add("numbers");
  const cap = document.createElement("caption");
  cap.textContent = caption;
  table.appendChild(cap);
  const head = document.createElement("tr");
  head.appendChild(Object.assign(document.createElement("th"), { className: "corner" }));
  columns.forEach((c) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.className = "key";
    th.appendChild(Object.assign(document.createElement("span"), { textContent: c }));
    head.appendChild(th);
  });
  const thead = document.createElement("thead");
  thead.appendChild(head);
  table.appendChild(thead);
  const tbody = document.createElement("tbody");
  rows.forEach((label, i) => {
    const tr = document.createElement("tr");
    tr.appendChild(Object.assign(document.createElement("th"),
      { scope: "row", className: "query", textContent: label }));
    columns.forEach((_, j) => tr.appendChild(cell(i, j)));
    tbody.appendChild(tr);
  });
  table.appendChild(tbody);
}

function drawLens(data) {
  const tokens = data.tokens.map(visible);
  const target = data.target_probs !== null;
  const values = target ? data.target_probs : data.top_probs.map((l) => l.map((p) => p[0]));
  lookTable($("look-main"),
    target ? `Probability of “${visible(data.target)}” (cell text: each layer's top token)`
           : "Top token of each layer at each position, shaded by its probability",
    tokens, data.layers, values, (i, j) => {
      const tops = data.top_tokens[i][j].map((t, k) => `${visible(t)} ${percent(data.top_probs[i][j][k])}`);
      return lookCell(values[i][j], visible(data.top_tokens[i][j][0]),
        `${data.layers[i]}, after “${tokens[j]}”: ${tops.join(", ")}` +
        (target ? `; “${visible(data.target)}” ${percent(values[i][j])}` : ""), false);
    });
  $("look-heads").replaceChildren();
  $("look-heads").hidden = true;
}

function drawPatch(data) {
  const tokens = data.corrupted_tokens.map(visible);
  const layers = data.resid.map((_, l) => `L${l}`);
  const fmt = (v) => v.toFixed(2);
  lookTable($("look-main"), "Patch the residual stream entering each layer, one position at a time",
    tokens, layers, data.resid,
    (i, j) => lookCell(data.resid[i][j], fmt(data.resid[i][j]),
      `layer ${i}, position ${j} (“${tokens[j]}”): ${fmt(data.resid[i][j])}`, true));
  const heads = data.heads[0].map((_, h) => `H${h}`);
  lookTable($("look-heads"), "Patch each head's output (hook_z), every position", heads, layers,
    data.heads, (i, j) => lookCell(data.heads[i][j], fmt(data.heads[i][j]),
      `layer ${i}, head ${j}: ${fmt(data.heads[i][j])}`, true));
  $("look-heads").hidden = false;
}

async function lookInside() {
  clearError();
  $("look-status").textContent = "Running…";
  try {
    const data = await (await call("POST", "/v1/inspect", lookRequest())).json();
    look.data = data;
    if (data.view === "logit-lens") {
      drawLens(data);
      $("look-status").textContent = `${data.tokens.length} tokens; rows: the residual stream entering each layer, then the final one, through ln_f and the head.`;
    } else {
      drawPatch(data);
      $("look-status").textContent = `Logit difference “${visible(data.answer)}” − “${visible(data.wrong)}”: clean ${data.clean_diff.toFixed(3)}, corrupted ${data.corrupted_diff.toFixed(3)}. 1 = the patch restores the clean answer, 0 = no effect.`;
    }
  } catch (err) {
    $("look-status").textContent = "Failed.";
    showError(err);
  }
}

function lookViewChanged() {
  const patching = $("look-view").value === "patch";
  for (const id of ["look-patch-fields"]) $(id).hidden = !patching;
  $("look-lens-fields").hidden = patching;
}

document.addEventListener("DOMContentLoaded", () => {
  $("look-form").addEventListener("submit", (e) => { e.preventDefault(); lookInside(); });
  $("look-view").addEventListener("change", lookViewChanged);
  lookViewChanged();
});
