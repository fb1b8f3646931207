// The prompt explorer's page: runs prompts through the JSON API (or, in a static export, reads
// the results embedded in the page) and shows tokens, top features and each feature's DFA.
"use strict";
(() => {
  const embedded = document.getElementById("explorer-data");
  const STATIC = embedded ? JSON.parse(embedded.textContent) : null;
  const $ = (id) => document.getElementById(id);
  const state = { info: null, prompt: null, run: null, token: null, detail: null };

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "data") Object.assign(node.dataset, value);
      else node[key] = value;
    }
    node.append(...children);
    return node;
  }

  const fmt = (x) => (Math.abs(x) >= 100 ? x.toFixed(1) : x.toPrecision(3));
  const shown = (token) => token.replace(/\n/g, "⏎").replace(/\t/g, "⇥") || "∅";

  function color(x) {
    const alpha = (Math.min(1, Math.abs(x)) * 0.8).toFixed(3);
    return x >= 0 ? `rgba(220, 50, 30, ${alpha})` : `rgba(30, 90, 220, ${alpha})`;
  }

  // -- data: the server's API, or what a static export embedded --------------------------------

  async function post(route, body) {
    if (STATIC) return staticAnswer(route, body);
    const response = await fetch(route, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    let data;
    try {
      data = await response.json();
    } catch (_) {
      throw new Error(`${route} answered HTTP ${response.status} without JSON`);
    }
    if (!response.ok) throw new Error(data.error || `${route} answered HTTP ${response.status}`);
    return data;
  }

  async function loadInfo() {
    if (STATIC) return STATIC.info;
    const response = await fetch("/api/info");
    if (!response.ok) throw new Error(`/api/info answered HTTP ${response.status}`);
    return response.json();
  }

  function staticAnswer(route, body) {
    if (route === "/api/run") return STATIC.run;
    const key = `${body.layer}:${body.feature}`;
    const common = STATIC.features[key];
    if (!common) {
      throw new Error(
        `feature ${body.feature} of layer ${body.layer} is not among this prompt's top ` +
          "features, which are all a static export holds; serve the explorer " +
          "(sae-lens-attn explore) to see any feature"
      );
    }
    let position = body.position;
    if (position === null || position === undefined) position = argmax(common.activations);
    const at = STATIC.positions[key][position];
    if (!at) {
      throw new Error(
        `this export holds feature ${body.feature}'s DFA only where it is a top feature ` +
          `(positions ${Object.keys(STATIC.positions[key]).join(", ")}), not at ${position}`
      );
    }
    const token = STATIC.run.tokens[position];
    return { ...common, ...at, layer: body.layer, feature: body.feature, position, token };
  }

  function argmax(values) {
    let best = 0;
    values.forEach((v, i) => {
      if (v > values[best]) best = i;
    });
    return best;
  }

  // -- rendering ------------------------------------------------------------------------------

  function showError(message) {
    $("error").textContent = message;
    $("error").hidden = !message;
  }

  function tokenRow(container, tokens, { values = null, selected = null, query = null, onClick }) {
    const scale = values ? Math.max(1e-12, ...values.map(Math.abs)) : 1;
    container.replaceChildren(
      ...tokens.map((token, i) => {
        const title = `position ${i}` + (values ? `: ${fmt(values[i])}` : "");
        const span = el("span", { class: "token", text: shown(token), title, data: { position: i } });
        if (values) span.style.background = color(values[i] / scale);
        if (i === selected) span.classList.add("selected");
        if (i === query) span.classList.add("query");
        span.addEventListener("click", () => onClick(i));
        return span;
      })
    );
  }

  function chip(layer, item, position) {
    const button = el(
      "button",
      {
        type: "button",
        class: "feature",
        title: `layer ${layer}, feature ${item.feature} at position ${position}`,
        data: { layer, feature: item.feature, position },
      },
      `L${layer}·${item.feature}`,
      el("span", { class: "act", text: fmt(item.activation) })
    );
    button.addEventListener("click", () => showFeature(Number(layer), item.feature, position));
    return button;
  }

  function renderRun() {
    const { run } = state;
    const layers = Object.keys(run.layers);
    tokenRow($("tokens"), run.tokens, { onClick: showToken });
    const head = el("tr", {}, el("th", { text: "pos" }), el("th", { text: "token" }));
    for (const layer of layers) head.append(el("th", { text: `layer ${layer}` }));
    const rows = run.tokens.map((token, position) => {
      const cell = el("td", { class: "tok", text: shown(token), title: "all layers' features here" });
      cell.addEventListener("click", () => showToken(position));
      const row = el("tr", { data: { position } }, el("td", { text: String(position) }), cell);
      for (const layer of layers) {
        const items = run.layers[layer][position];
        row.append(el("td", {}, ...items.slice(0, 5).map((item) => chip(layer, item, position))));
        if (items.length > 5) row.lastChild.append(el("span", { class: "muted", text: ` +${items.length - 5}` }));
      }
      return row;
    });
    $("feature-table").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
    for (const id of ["tokens-section", "table-section", "search"]) $(id).hidden = false;
    $("token-panel").hidden = true;
    $("dfa-panel").hidden = true;
    $("ablate-panel").hidden = true;
  }

  function showToken(position) {
    const { run } = state;
    state.token = position;
    const panel = $("token-panel");
    panel.replaceChildren(
      el("h2", { text: `Position ${position} “${shown(run.tokens[position])}”: features of every layer` })
    );
    for (const [layer, perPosition] of Object.entries(run.layers)) {
      const items = perPosition[position];
      panel.append(
        el("h3", { text: `layer ${layer}` }),
        items.length
          ? el("div", {}, ...items.map((item) => chip(layer, item, position)))
          : el("p", { class: "muted", text: "no active features" })
      );
    }
    panel.hidden = false;
    tokenRow($("tokens"), run.tokens, { selected: position, onClick: showToken });
  }

  async function showFeature(layer, feature, position) {
    showError("");
    try {
      const detail = await post("/api/feature", { prompt: state.prompt, layer, feature, position });
      state.detail = detail;
      renderFeature(detail);
    } catch (err) {
      showError(err.message);
    }
  }

  function renderFeature(d) {
    const { run } = state;
    const reselect = (q) => showFeature(d.layer, d.feature, q);
    const panel = $("dfa-panel");
    const sources = el("div", { class: "tokens" });
    tokenRow(sources, run.tokens, { values: d.by_src, query: d.position, onClick: reselect });
    const over = el("div", { class: "tokens" });
    tokenRow(over, run.tokens, { values: d.activations, query: d.position, onClick: reselect });
    const top = d.by_src
      .map((value, s) => ({ value, s }))
      .filter((x) => x.value !== 0)
      .sort((a, b) => Math.abs(b.value) - Math.abs(a.value))
      .slice(0, 5);
    panel.replaceChildren(
      el("h2", { text: `Layer ${d.layer} · feature ${d.feature}` }),
      el("p", {
        id: "dfa-summary",
        text:
          `at position ${d.position} “${shown(d.token)}”: activation ${fmt(d.activation)}, ` +
          `pre-activation ${fmt(d.pre_act)} = Σ sources ${fmt(d.pre_act - d.bias)} + bias ${fmt(d.bias)}`,
      }),
      el("h3", { text: "DFA by source position (red raises, blue lowers)" }),
      sources,
      el(
        "ol",
        { id: "dfa-top-sources" },
        ...top.map((x) => el("li", { text: `position ${x.s} “${shown(run.tokens[x.s])}”: ${fmt(x.value)}` }))
      ),
      el("h3", { text: "DFA by head" }),
      headBars(d.by_head),
      el("h3", { text: "Activation over the prompt" }),
      over
    );
    if (d.logits) panel.append(logitsView(d.logits));
    if (d.family) panel.append(familyView(d.family));
    if (d.dashboard) {
      panel.append(el("p", {}, el("a", { href: d.dashboard, target: "_blank", text: "dashboard page" })));
    }
    if (!STATIC) {
      const button = el("button", {
        type: "button",
        id: "ablate",
        text: `Ablate feature ${d.feature} at position ${d.position}`,
        title: "zero-ablate this feature here (SAE spliced, error term kept) and see the next-token logits move",
      });
      button.addEventListener("click", () => ablate(d.layer, d.feature, d.position));
      panel.append(el("h3", { text: "Ablation" }), button);
    }
    $("ablate-panel").hidden = true;
    panel.hidden = false;
    tokenRow($("tokens"), run.tokens, { values: d.by_src, query: d.position, onClick: showToken });
    document.querySelectorAll(".feature").forEach((button) => {
      const same = Number(button.dataset.layer) === d.layer && Number(button.dataset.feature) === d.feature;
      button.classList.toggle("selected", same);
    });
  }

  async function ablate(layer, feature, position) {
    showError("");
    try {
      const answer = await post("/api/ablate", { prompt: state.prompt, layer, feature, position });
      renderAblation(answer);
    } catch (err) {
      showError(err.message);
    }
  }

  function renderAblation(a) {
    const pct = (p) => `${(100 * p).toFixed(1)}%`;
    const moved = (t) => `${shown(t.token)}  ${fmt(t.before)} → ${fmt(t.after)} (${fmt(t.after - t.before)})`;
    const list = (id, items, text) => el("ol", { id }, ...items.map((t) => el("li", { text: text(t) })));
    const next = a.next_token
      ? `the prompt's next token “${shown(a.next_token.token)}”: logit ${fmt(a.next_token.before)} → ` +
        `${fmt(a.next_token.after)}, probability ${pct(a.next_token.prob_before)} → ${pct(a.next_token.prob_after)}`
      : "the position is the prompt's last: no next token in the prompt";
    const panel = $("ablate-panel");
    panel.replaceChildren(
      el("h2", { text: `Ablating layer ${a.layer} · feature ${a.feature} at position ${a.position}` }),
      el("p", {
        id: "ablate-summary",
        text:
          `“${shown(a.token)}”: activation ${fmt(a.activation)} zeroed (error term kept)` +
          (a.activation === 0 ? ", so nothing changes" : "") + `; ${next}.`,
      }),
      el(
        "div",
        { class: "logits" },
        el("div", {}, el("strong", { text: "top before" }), list("ablate-before", a.before, (t) => `${shown(t.token)}  ${pct(t.prob_before)} → ${pct(t.prob_after)}`)),
        el("div", {}, el("strong", { text: "top after" }), list("ablate-after", a.after, (t) => `${shown(t.token)}  ${pct(t.prob_after)} (was ${pct(t.prob_before)})`))
      ),
      el(
        "div",
        { class: "logits" },
        el("div", {}, el("strong", { text: "logits lowered most" }), list("ablate-lowered", a.lowered, moved)),
        el("div", {}, el("strong", { text: "logits raised most" }), list("ablate-raised", a.raised, moved))
      )
    );
    panel.hidden = false;
  }

  function headBars(byHead) {
    const scale = Math.max(1e-12, ...byHead.map(Math.abs));
    const grid = el("div", { class: "bars", id: "dfa-heads" });
    byHead.forEach((value, head) => {
      const bar = el("div", { class: value < 0 ? "bar negative" : "bar" });
      bar.style.width = `${(100 * Math.abs(value)) / scale}%`;
      grid.append(el("span", { text: `head ${head}` }), el("div", {}, bar), el("span", { text: fmt(value) }));
    });
    return grid;
  }

  function logitsView(logits) {
    const list = (items) => el("ol", {}, ...items.map((t) => el("li", { text: `${shown(t.token)}  ${fmt(t.value)}` })));
    return el(
      "div",
      { id: "feature-logits" },
      el("h3", { text: "Logit effects (W_dec · W_O · W_U)" }),
      el(
        "div",
        { class: "logits" },
        el("div", {}, el("strong", { text: "raises" }), list(logits.top)),
        el("div", {}, el("strong", { text: "lowers" }), list(logits.bottom))
      )
    );
  }

  function familyView(family) {
    const shares = Object.entries(family.shares)
      .filter(([, share]) => share !== null && share > 0)
      .sort((a, b) => b[1] - a[1])
      .map(([name, share]) => el("li", { text: `${name}: ${(100 * share).toFixed(0)}%` }));
    return el(
      "div",
      { id: "feature-family" },
      el("h3", { text: "Family" }),
      el("p", {}, el("span", { class: "family", text: family.label }), ` (over ${family.contexts} contexts)`),
      el("ul", {}, ...shares)
    );
  }

  // -- actions -----------------------------------------------------------------------------------

  async function runPrompt(event) {
    if (event) event.preventDefault();
    const prompt = $("prompt").value;
    showError("");
    $("busy").hidden = false;
    try {
      state.run = await post("/api/run", { prompt });
      state.prompt = prompt;
      renderRun();
    } catch (err) {
      showError(err.message);
    } finally {
      $("busy").hidden = true;
    }
  }

  async function search(event) {
    event.preventDefault();
    const layer = Number($("search-layer").value);
    const text = $("search-feature").value.trim();
    if (!/^\d+$/.test(text)) {
      showError(`feature search needs a feature index (an integer ≥ 0), got “${text}”`);
      return;
    }
    await showFeature(layer, Number(text), null);
  }

  async function start() {
    $("prompt-form").addEventListener("submit", runPrompt);
    $("search").addEventListener("submit", search);
    try {
      state.info = await loadInfo();
    } catch (err) {
      showError(err.message);
      return;
    }
    const { info } = state;
    const layers = info.layers.map((l) => `layer ${l.layer} (${l.d_sae} features)`).join(", ");
    $("model-info").textContent = `${info.model} (${info.backend}): ${layers}; prompts of up to ${info.context ?? "any number of"} tokens`;
    $("search-layer").replaceChildren(
      ...info.layers.map((l) => el("option", { value: String(l.layer), text: String(l.layer) }))
    );
    if (STATIC) {
      $("prompt").value = STATIC.prompt;
      $("prompt").readOnly = true;
      $("run").hidden = true;
      const nav = $("pages");
      nav.replaceChildren(
        "exported prompts: ",
        ...STATIC.pages.map((page) => el("a", { href: page.href, text: page.title + " " }))
      );
      nav.hidden = false;
      await runPrompt(null);
    }
  }

  start();
})();
