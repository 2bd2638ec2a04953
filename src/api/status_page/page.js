'use strict';
// The status page's live parts: numbers from /api/v1/status every few
// seconds, the latest events from the payload-free SSE feed. No framework.
(function () {
  var POLL_MS = 3000, TAIL_MAX = 50;
  var $ = function (id) { return document.getElementById(id); };
  var token = new URLSearchParams(location.search).get('token');
  function withToken(u) {
    return token ? u + (u.indexOf('?') < 0 ? '?' : '&') + 'token=' + encodeURIComponent(token) : u;
  }
  function set(id, text, cls) {
    var e = $(id);
    e.textContent = text;
    if (cls !== undefined) e.className = (e.className.indexOf('big') >= 0 ? 'big ' : '') + cls;
  }
  function bytes(n) {
    if (n === null || n === undefined) return 'n/a';
    var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + ' ' + u[i];
  }
  function dur(s) {
    if (s === null || s === undefined) return '—';
    s = Math.max(0, Math.round(s));
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
    return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
  }
  function ago(iso) {
    if (!iso) return 'never';
    var s = (Date.now() - Date.parse(iso)) / 1000;
    return s < 1 ? 'just now' : dur(s) + ' ago';
  }
  function clock(iso) {
    var d = new Date(iso);
    return isNaN(d) ? '' : d.toLocaleTimeString([], { hour12: false });
  }
  function rate(r) { return r < 10 ? r.toFixed(2) : r.toFixed(1); }

  var UPLINK = { up: ['up', 'ok'], connecting: ['connecting', 'warn'], stalled: ['STALLED', 'bad'], down: ['DOWN', 'bad'], disabled: ['not configured', 'dim'] };

  function renderUplink(s) {
    var u = s.uplink, look = UPLINK[u.state] || [u.state, ''];
    set('uplink-state', look[0] + (u.state === 'up' ? ' · ' + rate(u.forwarded_rows_per_second) + ' rows/s' : ''), look[1]);
    set('uplink-since', new Date(u.since).toLocaleString([], { hour12: false }) + ' (' + ago(u.since) + ')');
    set('uplink-reason', u.last_error || (u.state === 'disabled' ? 'no central.url set' : '—'));
  }

  function renderBacklog(s) {
    var l = s.log;
    if (s.buffering_only) {
      set('backlog-rows', 'buffering only: no central database set', 'dim long');
      set('backlog-oldest', l.total_rows.toLocaleString('en') + ' events kept in the log');
      $('backlog-oldest').previousElementSibling.textContent = 'kept';
      set('backlog-eta', '—');
      return;
    }
    $('backlog-oldest').previousElementSibling.textContent = 'oldest';
    set('backlog-rows', l.backlog_rows.toLocaleString('en') + ' waiting to forward', l.backlog_rows > 0 ? 'warn' : 'ok');
    set('backlog-oldest', l.oldest_pending_age_seconds === null ? 'nothing waiting' : dur(l.oldest_pending_age_seconds));
    set('backlog-eta', l.backlog_rows === 0 ? '—' : s.drain_eta_seconds === null ? 'not draining' : '~' + dur(s.drain_eta_seconds));
  }

  function renderNumbers(s) {
    set('uptime', dur(s.uptime_seconds));
    set('updated', 'updated ' + new Date().toLocaleTimeString([], { hour12: false }), '');
    renderUplink(s);
    renderBacklog(s);
    set('rate-http', rate(s.ingest.http));
    set('rate-ws', rate(s.ingest.ws));
    set('rate-mqtt', rate(s.ingest.mqtt));
    var d = s.disk, pct = d.log_max_bytes ? (100 * d.log_bytes) / d.log_max_bytes : 0;
    var level = pct >= 90 ? 'bad' : pct >= 70 ? 'warn' : '';
    set('disk-log', 'log ' + bytes(d.log_bytes) + ' of ' + bytes(d.log_max_bytes) + ' (' + pct.toFixed(1) + ' %)');
    $('disk-bar').style.width = Math.min(100, pct) + '%';
    $('disk-bar').className = level;
    set('disk-free', d.data_dir_free_bytes === null ? 'n/a' : bytes(d.data_dir_free_bytes) + ' of ' + bytes(d.data_dir_total_bytes));
    set('disk-write', d.write_bytes_per_day === null ? 'n/a' : (d.write_bytes_per_day / 1e9).toFixed(2) + ' GB/day' +
      (d.write_bytes_per_event === null ? '' : ', ' + Math.round(d.write_bytes_per_event).toLocaleString('en') + ' B/event'));
    var over = d.write_budget_bytes_per_day !== null && d.write_bytes_per_day !== null &&
      d.write_bytes_per_day > d.write_budget_bytes_per_day;
    set('disk-budget', d.write_budget_bytes_per_day === null ? 'none' :
      (d.write_budget_bytes_per_day / 1e9).toFixed(2) + ' GB/day' + (over ? ' (over)' : ''), over ? 'warn' : '');
    set('disk-life', d.endurance_days === null ? 'n/a' : d.endurance_days >= 730 ?
      (d.endurance_days / 365).toFixed(1) + ' years at this rate' : Math.round(d.endurance_days) + ' days at this rate',
      d.endurance_days !== null && d.endurance_days < 365 ? 'warn' : '');
    set('dead', s.log.dead_letters.toLocaleString('en'), s.log.dead_letters > 0 ? 'bad' : 'ok');
  }

  var devices = [];
  function renderDevices() {
    var q = $('filter').value.trim().toLowerCase(), body = $('devices').tBodies[0], rows = [], online = 0;
    devices.forEach(function (d) { if (d.online) online++; });
    set('dev-count', online + ' online · ' + (devices.length - online) + ' offline');
    devices.forEach(function (d) {
      var hay = (d.tenant + ' ' + d.device_id + ' ' + (d.name || '')).toLowerCase();
      if (q && hay.indexOf(q) < 0) return;
      var tr = document.createElement('tr'), who = document.createElement('td');
      tr.dataset.device = d.device_id;
      who.textContent = d.device_id + (d.name ? ' (' + d.name + ')' : '');
      var t = document.createElement('div'); t.className = 'tenant'; t.textContent = d.tenant; who.appendChild(t);
      var st = document.createElement('td'), dot = document.createElement('span');
      dot.className = 'dot' + (d.online ? ' ok' : '');
      st.appendChild(dot);
      st.appendChild(document.createTextNode(d.revoked ? 'revoked' : d.online ? 'online' : 'offline'));
      var seen = document.createElement('td'); seen.textContent = ago(d.last_seen);
      if (d.last_seen) seen.title = d.last_seen;
      tr.appendChild(who); tr.appendChild(st); tr.appendChild(seen);
      rows.push(tr);
    });
    body.replaceChildren.apply(body, rows);
  }

  function renderTenants(list) {
    var body = $('tenants').tBodies[0], rows = [];
    (list || []).forEach(function (t) {
      var tr = document.createElement('tr');
      tr.dataset.tenant = t.tenant;
      [t.tenant, String(t.mqtt_connections), String(t.stream_subscribers)].forEach(function (v) {
        var td = document.createElement('td'); td.textContent = v; tr.appendChild(td);
      });
      rows.push(tr);
    });
    if (!rows.length) {
      var tr = document.createElement('tr'), td = document.createElement('td');
      tr.className = 'empty'; td.colSpan = 3; td.textContent = 'none connected'; tr.appendChild(td); rows.push(tr);
    }
    body.replaceChildren.apply(body, rows);
  }

  function render(s) {
    // The status this page shows, for scripts (and the browser test) that
    // compare the page with the data it was drawn from.
    window.outpostStatus = s;
    renderNumbers(s);
    renderTenants(s.tenants);
    devices = s.devices;
    renderDevices();
  }

  function poll() {
    fetch(withToken('/api/v1/status'), { cache: 'no-store' })
      .then(function (r) { if (!r.ok) throw new Error('HTTP ' + r.status); return r.json(); })
      .then(render)
      .catch(function (e) { set('updated', 'status unreachable (' + e.message + ')', 'bad'); })
      .finally(function () { setTimeout(poll, POLL_MS); });
  }

  var lastSeq = 0;
  function addEvent(ev) {
    if (ev.seq <= lastSeq) return; // repeated after a reconnect
    lastSeq = ev.seq;
    var list = $('tail'), li = document.createElement('li');
    var empty = list.querySelector('.empty');
    if (empty) empty.remove();
    li.className = 'new';
    li.dataset.seq = ev.seq;
    var t = document.createElement('span'); t.className = 'time'; t.textContent = clock(ev.received_at);
    var dev = document.createElement('span'); dev.className = 'device'; dev.textContent = ev.device_id;
    var tn = document.createElement('div'); tn.className = 'tenant'; tn.textContent = ev.tenant; dev.appendChild(tn);
    var ty = document.createElement('span'); ty.className = 'type'; ty.textContent = ev.event_type;
    li.appendChild(t); li.appendChild(dev); li.appendChild(ty);
    list.insertBefore(li, list.firstChild);
    while (list.children.length > TAIL_MAX) list.lastChild.remove();
  }

  function listen() {
    var es = new EventSource(withToken('/api/v1/status/events'));
    es.onopen = function () { set('live', 'live', 'ok'); };
    es.onerror = function () { set('live', 'reconnecting…', 'warn'); };
    es.addEventListener('event', function (m) {
      try { addEvent(JSON.parse(m.data)); } catch (e) { /* a malformed frame is skipped */ }
    });
  }

  ['json-link', 'metrics-link'].forEach(function (id) { $(id).href = withToken($(id).getAttribute('href')); });
  $('filter').addEventListener('input', renderDevices);
  try { render(JSON.parse($('initial').textContent)); } catch (e) { set('updated', 'waiting for status…'); }
  setTimeout(poll, POLL_MS);
  listen();
})();
