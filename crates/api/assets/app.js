// sensorflow dashboard: sensors table (GET /sensors), live charts (WS /ws/raw/{id}?every=4),
// active sessions (GET /sessions?active=true plus aggregates from WS /ws/sessions).
// No framework: a few keyed tables and uPlot charts. All untrusted text goes through textContent.
'use strict';

(() => {
  const MAX_SELECTED = 4;
  const WINDOW_S = 10;
  const EVERY = 4;
  const SENSORS_REFRESH_MS = 1500;
  const SESSIONS_REFRESH_MS = 2000;
  const CHART_HEIGHT = 170;
  const RENDER_INTERVAL_MS = 100;

  const state = {
    sensors: [],
    selected: [],          // sensor ids, oldest first
    autoSelected: false,   // the first sensor is selected once; after that the user decides
    charts: new Map(),     // sensor id -> LiveChart
    aggregates: new Map(), // session id -> latest aggregate from /ws/sessions
    sessionsFeedUp: false,
  };

  // ---------- helpers ----------

  const $ = (id) => document.getElementById(id);

  function el(tag, props = {}, children = []) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props)) {
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = v;
      else if (k.startsWith('data-') || k.startsWith('aria-') || k === 'title') node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) node.append(c);
    return node;
  }

  function cssVar(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  // ---------- API token ----------
  // When the server requires bearer tokens (auth.api_tokens_file), the first API call answered
  // 401 asks for the token, once per page load, and keeps it in localStorage. It is sent as
  // `Authorization: Bearer` on fetches and as the `bearer.TOKEN` subprotocol on WebSockets
  // (browsers cannot set headers on a WebSocket).
  const TOKEN_KEY = 'sensorflow.api_token';
  let apiToken = null;
  try { apiToken = localStorage.getItem(TOKEN_KEY); } catch { /* storage disabled */ }
  let tokenPrompt = null;

  function askForToken() {
    if (!tokenPrompt) {
      tokenPrompt = Promise.resolve().then(() => {
        const given = window.prompt('This sensorflow server needs an API token (create one with `sensorflow token FILE NAME`):');
        const token = given ? given.trim() : '';
        if (token) {
          apiToken = token;
          try { localStorage.setItem(TOKEN_KEY, token); } catch { /* kept for this page only */ }
        }
      });
    }
    return tokenPrompt;
  }

  function apiFetch(url) {
    const headers = apiToken ? { Authorization: `Bearer ${apiToken}` } : {};
    return fetch(url, { cache: 'no-store', headers });
  }

  async function getJSON(url) {
    const sent = apiToken;
    let response = await apiFetch(url);
    if (response.status === 401) {
      if (sent && sent === apiToken) {
        // The stored token is no longer valid.
        apiToken = null;
        try { localStorage.removeItem(TOKEN_KEY); } catch { /* nothing stored */ }
      }
      await askForToken();
      if (apiToken && apiToken !== sent) response = await apiFetch(url);
    }
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  function wsUrl(path) {
    const proto = location.protocol === 'https:' ? 'wss:' : 'ws:';
    return `${proto}//${location.host}${path}`;
  }

  const fmt = {
    num(v, digits = 0) {
      if (v == null || !Number.isFinite(v)) return '–';
      return v.toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
    },
    ago(us) {
      if (us == null) return 'never';
      const s = Math.max(0, (Date.now() - us / 1000) / 1000);
      if (s < 60) return `${s.toFixed(1)} s ago`;
      if (s < 3600) return `${Math.floor(s / 60)} min ago`;
      return `${Math.floor(s / 3600)} h ago`;
    },
    duration(s) {
      if (s == null || !Number.isFinite(s)) return '–';
      if (s < 60) return `${s.toFixed(1)} s`;
      const m = Math.floor(s / 60);
      if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, '0')} s`;
      return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, '0')} min`;
    },
    time(us) {
      if (us == null) return '–';
      return new Date(us / 1000).toLocaleTimeString();
    },
  };

  function freshness(us) {
    if (us == null) return 'silent';
    const s = (Date.now() - us / 1000) / 1000;
    return s < 5 ? 'fresh' : s < 60 ? 'stale' : 'silent';
  }

  // Polls `fn` every `ms`, never overlapping itself.
  function poll(fn, ms) {
    const tick = async () => {
      try { await fn(); } finally { setTimeout(tick, ms); }
    };
    tick();
  }

  // A WebSocket that reconnects with backoff until closed by us.
  function liveSocket(path, { onMessage, onState }) {
    let socket = null;
    let closed = false;
    let delay = 500;
    const open = () => {
      if (closed) return;
      onState('connecting');
      socket = apiToken ? new WebSocket(wsUrl(path), [`bearer.${apiToken}`]) : new WebSocket(wsUrl(path));
      socket.onopen = () => { delay = 500; onState('live'); };
      socket.onmessage = (ev) => onMessage(ev.data);
      socket.onclose = () => {
        if (closed) return;
        onState('reconnecting');
        setTimeout(open, delay);
        delay = Math.min(delay * 2, 5000);
      };
    };
    open();
    return { close() { closed = true; if (socket) socket.close(); } };
  }

  function setConnection(ok) {
    const pill = $('connection');
    pill.dataset.state = ok ? 'live' : 'down';
    pill.textContent = ok ? 'live' : 'server unreachable';
  }

  // ---------- sensors ----------

  const sensorRows = new Map(); // sensor id -> { tr, cells }

  function sensorRow(id) {
    let row = sensorRows.get(id);
    if (row) return row;
    const cells = {
      mark: el('td', { class: 'mark' }, [el('span', { class: 'swatch' })]),
      id: el('td', { class: 'id' }),
      seen: el('td'),
      sps: el('td', { class: 'num' }),
      pps: el('td', { class: 'num' }),
      samples: el('td', { class: 'num' }),
      bad: el('td', { class: 'num' }),
      gaps: el('td', { class: 'num' }),
      late: el('td', { class: 'num' }),
      session: el('td', { class: 'id muted' }),
    };
    const tr = el('tr', { 'data-testid': 'sensor-row', 'data-sensor-id': id }, Object.values(cells));
    tr.addEventListener('click', () => toggleSensor(id));
    row = { tr, cells };
    sensorRows.set(id, row);
    return row;
  }

  function renderSensors(list) {
    state.sensors = list;
    const body = $('sensors-body');
    const seen = new Set();
    list.forEach((s, i) => {
      seen.add(s.sensor_id);
      const { tr, cells } = sensorRow(s.sensor_id);
      cells.id.textContent = s.sensor_id;
      const dot = el('span', { class: `dot ${freshness(s.last_seen_us)}` });
      cells.seen.replaceChildren(dot, fmt.ago(s.last_seen_us));
      cells.seen.title = s.last_seen_us == null ? '' : new Date(s.last_seen_us / 1000).toISOString();
      cells.sps.textContent = fmt.num(s.samples_per_s, 1);
      cells.pps.textContent = fmt.num(s.packets_per_s, 2);
      cells.samples.textContent = fmt.num(s.samples_decoded);
      cells.bad.textContent = fmt.num(s.bad_total);
      cells.bad.className = s.bad_total > 0 ? 'num bad' : 'num';
      cells.bad.title = Object.entries(s.bad || {}).map(([k, v]) => `${k}: ${v}`).join('\n');
      cells.gaps.textContent = fmt.num(s.gaps);
      cells.gaps.className = s.gaps > 0 ? 'num warn' : 'num';
      cells.gaps.title = `${s.missing_samples} missing samples`;
      cells.late.textContent = fmt.num(s.late);
      cells.session.textContent = s.active_session_id || '–';
      tr.classList.toggle('selected', state.selected.includes(s.sensor_id));
      tr.setAttribute('aria-selected', String(state.selected.includes(s.sensor_id)));
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const [id, row] of sensorRows) {
      if (!seen.has(id)) { row.tr.remove(); sensorRows.delete(id); }
    }
    $('sensors-empty').hidden = list.length > 0;

    if (!state.autoSelected && list.length > 0) {
      state.autoSelected = true;
      if (state.selected.length === 0) toggleSensor(list[0].sensor_id);
    }
    const rate = list.reduce((sum, s) => sum + (s.samples_per_s || 0), 0);
    state.summary = { sensors: list.length, rate };
    renderSummary();
  }

  function renderSummary() {
    const s = state.summary || { sensors: 0, rate: 0 };
    const sessions = state.activeSessions ?? 0;
    $('summary').textContent =
      `${s.sensors} sensor${s.sensors === 1 ? '' : 's'} · ${fmt.num(s.rate, 0)} samples/s · ` +
      `${sessions} active session${sessions === 1 ? '' : 's'}`;
  }

  function toggleSensor(id) {
    const at = state.selected.indexOf(id);
    if (at >= 0) {
      state.selected.splice(at, 1);
      removeChart(id);
    } else {
      if (state.selected.length >= MAX_SELECTED) removeChart(state.selected.shift());
      state.selected.push(id);
      addChart(id);
    }
    for (const [sid, row] of sensorRows) {
      row.tr.classList.toggle('selected', state.selected.includes(sid));
      row.tr.setAttribute('aria-selected', String(state.selected.includes(sid)));
    }
    $('charts-empty').hidden = state.selected.length > 0;
  }

  // ---------- live charts ----------

  function axis(scale, label, side, grid) {
    return {
      scale,
      label,
      side,
      stroke: cssVar('--axis'),
      grid: { show: grid, stroke: cssVar('--grid'), width: 1 },
      ticks: { stroke: cssVar('--grid'), width: 1 },
      size: 52,
      labelSize: 18,
    };
  }

  function series(label, scale, color, unit, digits, fill) {
    return {
      label,
      scale,
      stroke: color,
      width: 1.5,
      fill,
      points: { show: false },
      value: (u, v) => (v == null ? '–' : `${v.toFixed(digits)} ${unit}`),
    };
  }

  class LiveChart {
    constructor(sensorId) {
      this.sensorId = sensorId;
      this.t = []; this.accl = []; this.gyro = []; this.vel = []; this.prob = [];
      this.points = 0;
      this.dirty = false;
      this.lastRender = 0;

      this.pointsEl = el('span', { class: 'stat', 'data-testid': 'chart-points', text: '0' });
      this.stateEl = el('span', { class: 'pill', 'data-testid': 'chart-state', text: 'connecting' });
      const close = el('button', { type: 'button', title: 'stop charting this sensor', text: '×' });
      close.addEventListener('click', () => toggleSensor(sensorId));
      this.motionEl = el('div', { class: 'chart' });
      this.velocityEl = el('div', { class: 'chart' });
      this.card = el('div', { class: 'chart-card', 'data-testid': 'chart-card', 'data-sensor-id': sensorId }, [
        el('div', { class: 'chart-head' }, [
          el('h3', { text: sensorId }),
          this.stateEl,
          el('span', { class: 'spacer' }),
          el('span', { class: 'stat' }, ['points received: ', this.pointsEl]),
          close,
        ]),
        el('div', { class: 'chart-title', text: 'Motion · |acc| (g), |gyro| (rad/s)' }),
        this.motionEl,
        el('div', { class: 'chart-title', text: 'Model · velocity (m/s), movement probability' }),
        this.velocityEl,
      ]);
      $('charts').append(this.card);

      const width = this.width();
      // uPlot keeps the option objects it is given, so each chart gets its own.
      const x = () => ({
        time: true,
        range: () => {
          const end = this.t.length ? this.t[this.t.length - 1] : Date.now() / 1000;
          return [end - WINDOW_S, end];
        },
      });
      const xAxis = () => ({ ...axis('x', undefined, 2, true), size: 30 });
      this.motion = new uPlot({
        width, height: CHART_HEIGHT,
        cursor: { drag: { x: false, y: false } },
        scales: { x: x(), g: { auto: true }, rad: { auto: true } },
        series: [
          {},
          series('accl_mag', 'g', cssVar('--chart-1'), 'g', 3),
          series('gyro_mag', 'rad', cssVar('--chart-2'), 'rad/s', 3),
        ],
        axes: [xAxis(), axis('g', 'g', 3, true), axis('rad', 'rad/s', 1, false)],
      }, [[], [], []], this.motionEl);
      this.velocity = new uPlot({
        width, height: CHART_HEIGHT,
        cursor: { drag: { x: false, y: false } },
        scales: { x: x(), v: { auto: true, range: (u, min, max) => [Math.min(0, min), Math.max(0.5, max)] }, p: { range: [0, 1] } },
        series: [
          {},
          series('velocity_pred', 'v', cssVar('--chart-3'), 'm/s', 2),
          series('movement_prob', 'p', cssVar('--chart-4'), '', 2, cssVar('--chart-4-fill')),
        ],
        axes: [xAxis(), axis('v', 'm/s', 3, true), axis('p', 'p', 1, false)],
      }, [[], [], []], this.velocityEl);

      this.resizer = new ResizeObserver(() => {
        const w = this.width();
        this.motion.setSize({ width: w, height: CHART_HEIGHT });
        this.velocity.setSize({ width: w, height: CHART_HEIGHT });
      });
      this.resizer.observe(this.card);

      this.socket = liveSocket(`/ws/raw/${encodeURIComponent(sensorId)}?every=${EVERY}`, {
        onMessage: (data) => this.onMessage(data),
        onState: (s) => { this.stateEl.textContent = s; this.stateEl.dataset.state = s === 'live' ? 'live' : 'connecting'; },
      });
    }

    width() {
      return Math.max(280, this.card.clientWidth - 26);
    }

    onMessage(data) {
      const rows = JSON.parse(data);
      for (const r of rows) {
        const t = r.timestamp_us / 1e6;
        // A restarted device or a new session may go back in time: start the window afresh.
        if (this.t.length && t < this.t[this.t.length - 1]) this.clear();
        this.t.push(t);
        this.accl.push(r.accl_mag);
        this.gyro.push(r.gyro_mag);
        this.vel.push(r.velocity_pred);
        this.prob.push(r.movement_prob);
      }
      this.points += rows.length;
      this.dirty = true;
    }

    clear() {
      this.t = []; this.accl = []; this.gyro = []; this.vel = []; this.prob = [];
    }

    render(now) {
      if (!this.dirty || now - this.lastRender < RENDER_INTERVAL_MS) return;
      this.dirty = false;
      this.lastRender = now;
      const end = this.t[this.t.length - 1];
      let cut = 0;
      while (cut < this.t.length && this.t[cut] < end - WINDOW_S) cut++;
      if (cut > 0) {
        for (const a of [this.t, this.accl, this.gyro, this.vel, this.prob]) a.splice(0, cut);
      }
      this.motion.setData([this.t, this.accl, this.gyro]);
      this.velocity.setData([this.t, this.vel, this.prob]);
      this.pointsEl.textContent = String(this.points);
    }

    destroy() {
      this.socket.close();
      this.resizer.disconnect();
      this.motion.destroy();
      this.velocity.destroy();
      this.card.remove();
    }
  }

  function addChart(id) {
    if (!state.charts.has(id)) state.charts.set(id, new LiveChart(id));
  }

  function removeChart(id) {
    const chart = state.charts.get(id);
    if (chart) { chart.destroy(); state.charts.delete(id); }
  }

  function renderLoop(now) {
    for (const chart of state.charts.values()) chart.render(now);
    requestAnimationFrame(renderLoop);
  }

  // ---------- sessions ----------

  const sessionRows = new Map(); // session id -> { tr, cells }
  let lastSessions = [];

  function sessionRow(id) {
    let row = sessionRows.get(id);
    if (row) return row;
    const cells = {
      id: el('td', { class: 'id' }),
      sensor: el('td', { class: 'id' }),
      started: el('td'),
      duration: el('td', { class: 'num' }),
      samples: el('td', { class: 'num' }),
      distance: el('td', { class: 'num' }),
      maxV: el('td', { class: 'num' }),
      meanV: el('td', { class: 'num' }),
      moving: el('td', { class: 'num' }),
    };
    const tr = el('tr', { 'data-testid': 'sessions-row', 'data-session-id': id }, Object.values(cells));
    row = { tr, cells };
    sessionRows.set(id, row);
    return row;
  }

  // The newest of the aggregate served with the session and the one from the live feed.
  function aggregateOf(session) {
    const live = state.aggregates.get(session.session_id);
    const stored = session.aggregate;
    if (!live) return stored || null;
    if (!stored) return live;
    return live.emitted_at_us >= stored.emitted_at_us ? live : stored;
  }

  function renderSessions(list) {
    lastSessions = list;
    const body = $('sessions-body');
    const seen = new Set();
    list.forEach((s, i) => {
      seen.add(s.session_id);
      const { tr, cells } = sessionRow(s.session_id);
      const a = aggregateOf(s);
      cells.id.textContent = s.session_id;
      cells.sensor.textContent = s.sensor_id;
      cells.started.textContent = fmt.time(s.start_us);
      cells.duration.textContent = fmt.duration(a ? a.duration_s : (s.last_seen_us - s.start_us) / 1e6);
      cells.samples.textContent = fmt.num(a ? Math.max(a.sample_count, s.sample_count) : s.sample_count);
      cells.distance.textContent = a ? `${fmt.num(a.distance_m, 1)} m` : '–';
      cells.maxV.textContent = a ? `${fmt.num(a.max_velocity, 2)} m/s` : '–';
      cells.meanV.textContent = a ? `${fmt.num(a.mean_velocity, 2)} m/s` : '–';
      cells.moving.textContent = a ? fmt.duration(a.moving_time_s) : '–';
      if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
    });
    for (const [id, row] of sessionRows) {
      if (!seen.has(id)) { row.tr.remove(); sessionRows.delete(id); }
    }
    $('sessions-empty').hidden = list.length > 0;
    state.activeSessions = list.length;
    renderSummary();
  }

  function onSessionMessage(data) {
    const m = JSON.parse(data);
    if (m.type === 'aggregate') {
      state.aggregates.set(m.session_id, m);
      if (sessionRows.has(m.session_id)) renderSessions(lastSessions);
    } else if (m.type === 'session_event' && m.event === 'ended') {
      state.aggregates.delete(m.session.session_id);
    }
  }

  // ---------- start ----------

  poll(async () => {
    try {
      renderSensors(await getJSON('/sensors?limit=1000'));
      setConnection(true);
    } catch (e) {
      setConnection(false);
    }
  }, SENSORS_REFRESH_MS);

  poll(async () => {
    try {
      renderSessions(await getJSON('/sessions?active=true&limit=50'));
    } catch (e) {
      // The sensors poll reports the connection state.
    }
  }, SESSIONS_REFRESH_MS);

  // Opened after the first API call succeeded, so that it carries the token when one is needed.
  getJSON('/health').then(() => getJSON('/sensors?limit=1')).catch(() => {}).finally(() => {
    liveSocket('/ws/sessions', { onMessage: onSessionMessage, onState: () => {} });
  });
  requestAnimationFrame(renderLoop);
})();
