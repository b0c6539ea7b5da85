// Browser client of the legacy duplex protocol (PROTOCOL.md §1, WebSocket /ws/duplex/{session_id}).
// Captures 1 s of 16 kHz microphone audio (+ one JPEG camera frame in omni mode) per second, sends it
// as `audio_chunk`, plays the 24 kHz speech of speaking results back to back, and shows transcript,
// listen/speak state, queue position and per-unit latency.
'use strict';

const CHUNK_SAMPLES = 16000;          // 1 s at 16 kHz: one model unit
const PLAYBACK_RATE = 24000;          // sample rate of result.audio_data
const TURN_START_DELAY_S = 0.2;       // jitter buffer before the first audio of a turn
const FRAME_QUALITY = 0.7;            // JPEG quality of camera frames
const FRAME_MAX_WIDTH = 640;
const PREPARE_FALLBACK_MS = 100;      // send prepare this long after open if no queue message came
const FORCE_LISTEN_CHUNKS = 2;        // chunks sent with force_listen after a barge-in
const PAUSE_TIMEOUT_S = 60;
const STATUS_POLL_MS = 10000;

const $ = (id) => document.getElementById(id);
const apiKey = new URLSearchParams(location.search).get('api_key');

// Counters for tests (tests/test_web_page.py) and for looking around in the console.
window.__omni = { chunksSent: 0, results: 0, units: 0, scheduledBuffers: 0, flushes: 0, state: 'idle', errors: [] };

// ---------------------------------------------------------------- helpers

function base64FromFloat32(samples) {
  const bytes = new Uint8Array(samples.buffer, samples.byteOffset, samples.byteLength);
  let binary = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(binary);
}

// Typed arrays use the platform's byte order, which is little-endian on every browser platform.
function float32FromBase64(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length - (binary.length % 4));
  for (let i = 0; i < bytes.length; i++) bytes[i] = binary.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

function withApiKey(path) {
  const url = new URL(path, location.href);
  if (apiKey) url.searchParams.set('api_key', apiKey);
  return url;
}

function setBadge(id, text, cls) {
  const el = $(id);
  el.textContent = text;
  el.className = 'badge' + (cls ? ' ' + cls : '');
}

function showError(text) {
  window.__omni.errors.push(text);
  $('error').textContent = text;
  $('error').hidden = false;
}

function ms(value) {
  return typeof value === 'number' ? `${Math.round(value)} ms` : '—';
}

// ---------------------------------------------------------------- playback

// Schedules 24 kHz buffers back to back on one AudioContext clock, so consecutive units play without gaps.
class Player {
  constructor() {
    this.ctx = new AudioContext();
    this.nextTime = 0;
    this.inTurn = false;
    this.sources = new Set();
  }

  play(samples) {
    if (samples.length === 0) return;
    const buffer = this.ctx.createBuffer(1, samples.length, PLAYBACK_RATE);
    buffer.copyToChannel(samples, 0);
    const source = this.ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(this.ctx.destination);
    const now = this.ctx.currentTime;
    // A new turn, or an underrun (the clock passed the end of what is queued), restarts the jitter buffer.
    if (!this.inTurn || this.nextTime < now) this.nextTime = now + TURN_START_DELAY_S;
    source.start(this.nextTime);
    this.nextTime += buffer.duration;
    this.inTurn = true;
    this.sources.add(source);
    source.onended = () => this.sources.delete(source);
    window.__omni.scheduledBuffers++;
  }

  endTurn() {
    this.inTurn = false;
  }

  // Barge-in: silence everything already scheduled.
  flush() {
    for (const source of this.sources) source.stop();
    this.sources.clear();
    this.inTurn = false;
    window.__omni.flushes++;
  }

  close() {
    this.flush();
    this.ctx.close();
  }
}

// ---------------------------------------------------------------- capture

// Microphone (AudioWorklet, resampled to 16 kHz in 1 s chunks) and, in omni mode, the camera.
class Capture {
  async start(withVideo, onChunk) {
    this.stream = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
      video: withVideo ? { width: { ideal: 640 }, height: { ideal: 480 } } : false,
    });
    this.ctx = new AudioContext();
    await this.ctx.audioWorklet.addModule('/static/audio-capture-worklet.js');
    const source = this.ctx.createMediaStreamSource(this.stream);
    this.node = new AudioWorkletNode(this.ctx, 'capture-16k', { processorOptions: { chunkSamples: CHUNK_SAMPLES } });
    this.node.port.onmessage = (event) => onChunk(event.data);
    // The worklet must be part of a graph that reaches the destination to be run; a muted gain keeps it silent.
    const mute = this.ctx.createGain();
    mute.gain.value = 0;
    source.connect(this.node).connect(mute).connect(this.ctx.destination);

    this.video = $('preview');
    this.video.hidden = !withVideo;
    if (withVideo) {
      this.video.srcObject = this.stream;
      this.canvas = document.createElement('canvas');
    }
  }

  // One JPEG of the current camera picture, base64 without the data: prefix; null if no picture yet.
  grabFrame() {
    const video = this.video;
    if (!this.canvas || !video.videoWidth) return null;
    const scale = Math.min(1, FRAME_MAX_WIDTH / video.videoWidth);
    this.canvas.width = Math.round(video.videoWidth * scale);
    this.canvas.height = Math.round(video.videoHeight * scale);
    this.canvas.getContext('2d').drawImage(video, 0, 0, this.canvas.width, this.canvas.height);
    return this.canvas.toDataURL('image/jpeg', FRAME_QUALITY).split(',', 2)[1];
  }

  stop() {
    if (this.stream) this.stream.getTracks().forEach((track) => track.stop());
    if (this.ctx) this.ctx.close();
    if (this.video) {
      this.video.srcObject = null;
      this.video.hidden = true;
    }
  }
}

// ---------------------------------------------------------------- session

class DuplexSession {
  constructor(mode, systemPrompt) {
    this.mode = mode;
    this.systemPrompt = systemPrompt;
    this.sessionId = (mode === 'audio' ? 'adx_' : 'omni_') + Date.now().toString(36);
    this.streaming = false;         // true after `prepared`
    this.paused = false;
    this.closed = false;
    this.prepareSent = false;
    this.sawQueueMessage = false;
    this.sendTimes = [];            // performance.now() of each chunk without a result yet (results come in order)
    this.forceListenLeft = 0;
    this.muteUntilResult = 0;       // results before this index were in flight at barge-in: not played
    this.resultCount = 0;           // result frames, including `buffered` ones that ran no unit
    this.unitCount = 0;
    this.wallSum = 0;
    this.wallCount = 0;
    this.costSum = 0;
    this.costCount = 0;
    this.turnParagraph = null;
  }

  async start() {
    this.player = new Player();   // created inside the click handler, so autoplay rules allow it
    this.capture = new Capture();
    await this.capture.start(this.mode === 'omni', (chunk) => this.sendChunk(chunk));
    const url = withApiKey(`/ws/duplex/${this.sessionId}`);
    url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
    this.ws = new WebSocket(url);
    this.ws.onopen = () => {
      setState('connected');
      setTimeout(() => { if (!this.sawQueueMessage) this.sendPrepare(); }, PREPARE_FALLBACK_MS);
    };
    this.ws.onmessage = (event) => this.onMessage(JSON.parse(event.data));
    this.ws.onclose = (event) => this.onClose(event);
  }

  send(message) {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(JSON.stringify(message));
  }

  sendPrepare() {
    if (this.prepareSent) return;
    this.prepareSent = true;
    this.send({ type: 'prepare', system_prompt: this.systemPrompt, config: { length_penalty: 1.1 } });
  }

  sendChunk(samples) {
    if (!this.streaming || this.paused || this.closed) return;
    const message = { type: 'audio_chunk', audio_base64: base64FromFloat32(samples) };
    if (this.mode === 'omni') {
      const frame = this.capture.grabFrame();
      if (frame) message.frame_base64_list = [frame];
    }
    if (this.forceListenLeft > 0) {
      message.force_listen = true;
      this.forceListenLeft--;
    }
    this.sendTimes.push(performance.now());
    this.send(message);
    window.__omni.chunksSent++;
  }

  onMessage(msg) {
    switch (msg.type) {
      case 'queued':
      case 'queue_update':
        this.sawQueueMessage = true;
        $('queue').textContent = `Queue position ${msg.position} of ${msg.queue_length}, ` +
          `about ${Math.round(msg.estimated_wait_s)} s`;
        break;
      case 'queue_done':
        this.sawQueueMessage = true;
        $('queue').textContent = '';
        this.sendPrepare();
        break;
      case 'prepared':
        this.streaming = true;
        setState('live');
        break;
      case 'result':
        this.onResult(msg);
        break;
      case 'paused':
        setState('paused');
        break;
      case 'resumed':
        setState('live');
        break;
      case 'timeout':
        showError(`Session ended: ${msg.reason}`);
        break;
      case 'error':
        if (!String(msg.error).includes('paused')) showError(msg.error);
        if (this.streaming) this.sendTimes.shift();  // after `prepared`, an error answers an audio_chunk
        break;
      default:
        break;  // `stopped`, `interrupted` and unknown types need no action
    }
  }

  onResult(result) {
    const sentAt = this.sendTimes.shift();
    const index = this.resultCount++;
    window.__omni.results = this.resultCount;
    if (result.buffered) return;
    this.updateMetrics(result, sentAt);

    if (result.is_listen) {
      setBadge('model-state', 'listening', 'listen');
      this.endTurn();  // the next listening result ends the local turn
      if (result.text) this.addLine(result.text, 'user');
      return;
    }
    setBadge('model-state', 'speaking', 'speak');
    if (result.text) this.appendSpeech(result.text);
    if (result.audio_data && index >= this.muteUntilResult) this.player.play(float32FromBase64(result.audio_data));
    if (result.end_of_turn) this.endTurn();
  }

  updateMetrics(result, sentAt) {
    this.unitCount += result.units ?? 1;
    window.__omni.units = this.unitCount;
    $('m-units').textContent = String(this.unitCount);
    if (typeof result.wall_clock_ms === 'number') {
      this.wallSum += result.wall_clock_ms;
      this.wallCount++;
      $('m-wall').textContent = `${ms(result.wall_clock_ms)} / ${ms(this.wallSum / this.wallCount)}`;
    }
    if (typeof result.cost_all_ms === 'number') {
      this.costSum += result.cost_all_ms;
      this.costCount++;
      $('m-cost').textContent = `${ms(result.cost_all_ms)} / ${ms(this.costSum / this.costCount)}`;
    }
    if (typeof result.kv_cache_length === 'number') $('m-kv').textContent = `${result.kv_cache_length} tokens`;
    $('m-vision').textContent = `${result.vision_slices ?? 0} / ${result.vision_tokens ?? 0}`;
    if (sentAt !== undefined) $('m-drift').textContent = ms(performance.now() - sentAt);
  }

  appendSpeech(text) {
    if (!this.turnParagraph) this.turnParagraph = this.addLine('', 'assistant');
    this.turnParagraph.textContent += text;
  }

  addLine(text, cls) {
    const line = document.createElement('p');
    line.className = cls;
    line.textContent = text;
    $('transcript').appendChild(line);
    $('transcript').scrollTop = $('transcript').scrollHeight;
    return line;
  }

  endTurn() {
    this.turnParagraph = null;
    this.player.endTurn();
  }

  bargeIn() {
    this.forceListenLeft = FORCE_LISTEN_CHUNKS;
    this.muteUntilResult = this.resultCount + this.sendTimes.length;
    this.player.flush();
    this.endTurn();
  }

  pause() {
    this.paused = true;
    this.send({ type: 'pause', timeout: PAUSE_TIMEOUT_S });
  }

  resume() {
    this.paused = false;
    this.send({ type: 'resume' });
  }

  stop() {
    this.send({ type: 'stop' });
    this.shutdown();
  }

  onClose(event) {
    if (!this.closed && event.code !== 1000) {
      showError(`Connection closed (${event.code}${event.reason ? ': ' + event.reason : ''})`);
    }
    this.shutdown();
  }

  shutdown() {
    if (this.closed) return;
    this.closed = true;
    this.streaming = false;
    if (this.ws) this.ws.close();
    this.capture.stop();
    this.player.close();
    setState('stopped');
  }
}

// ---------------------------------------------------------------- page wiring

let current = null;

function setState(state) {
  window.__omni.state = state;
  setBadge('conn-state', state, '');
  const live = current && !current.closed;
  $('start').disabled = Boolean(live);
  $('stop').disabled = !live;
  $('barge-in').disabled = state !== 'live';
  $('pause').disabled = state !== 'live';
  $('resume').disabled = state !== 'paused';
  document.querySelectorAll('#mode input').forEach((input) => { input.disabled = Boolean(live); });
}

$('start').onclick = async () => {
  const mode = document.querySelector('#mode input:checked').value;
  $('error').hidden = true;
  $('transcript').replaceChildren();
  current = new DuplexSession(mode, $('system-prompt').value);
  setState('starting');
  try {
    await current.start();
  } catch (err) {
    showError(`Could not start: ${err.message || err}`);
    current.shutdown();
  }
};
$('stop').onclick = () => current.stop();
$('pause').onclick = () => current.pause();
$('resume').onclick = () => current.resume();
$('barge-in').onclick = () => current.bargeIn();

async function pollWorkers() {
  try {
    const response = await fetch(withApiKey('/status'));
    if (!response.ok) return;
    const status = await response.json();
    $('workers').textContent = `Workers: ${status.idle_workers} idle of ${status.total_workers}`;
  } catch (err) {
    $('workers').textContent = '';
  }
}
pollWorkers();
setInterval(pollWorkers, STATUS_POLL_MS);
