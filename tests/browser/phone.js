// A browser far end for edgeagent tests. Speaks protocol section 4 (complete,
// non-trickle SDP over MQTT), places and answers calls, and measures what it
// hears with a WebAudio AnalyserNode. Selenium reads the window globals:
//   window.phone  {ready, state, callId, peer, error, log[], events[], audio{...}}
//   window.phoneDial(peer) -> callId, window.phoneHangup(reason)
// Candidates are limited to 127.0.0.1 both ways: tests never leave loopback.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const me = params.get("id") || "browser-1";
  const prefix = params.get("prefix") || "edge/v1";
  const brokerUrl = params.get("broker");
  const answerPolicy = params.get("answer") || "auto"; // auto | reject

  const phone = {
    ready: false, state: "idle", callId: null, peer: null, error: null,
    log: [], events: [], audio: null, connectedMs: null,
  };
  window.phone = phone;

  function log(msg) {
    const line = `${(performance.now() / 1000).toFixed(3)} ${msg}`;
    phone.log.push(line);
    const el = document.getElementById("log");
    if (el) el.textContent += line + "\n";
  }
  function setState(state) {
    phone.state = state;
    phone.events.push(state);
    log(`state ${state}`);
  }
  function fail(where, err) {
    phone.error = `${where}: ${err && err.message ? err.message : err}`;
    log(`error ${phone.error}`);
  }

  let client = null;
  let pc = null;
  let localStream = null;
  let offerStartedAt = null;

  // --- signaling ------------------------------------------------------------------
  function send(to, type, fields) {
    const msg = Object.assign(
      { v: 1, type: type, call_id: phone.callId, from: me, to: to, ts: Date.now() / 1000 },
      fields || {},
    );
    client.publish(`${prefix}/${to}/signal`, JSON.stringify(msg), { qos: 1 });
    log(`sent ${type} to ${to}`);
  }

  function randomHex(bytes) {
    const a = new Uint8Array(bytes);
    crypto.getRandomValues(a);
    return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function onSignal(payload) {
    let msg;
    try {
      msg = JSON.parse(payload);
    } catch (err) {
      return fail("signal", err);
    }
    if (msg.to !== me) return;
    log(`got ${msg.type} ${msg.call_id} from ${msg.from}`);
    if (msg.type === "offer") {
      if (phone.state !== "idle") {
        return send(msg.from, "reject", { call_id: msg.call_id, reason: "busy" });
      }
      if (answerPolicy === "reject") {
        return send(msg.from, "reject", { call_id: msg.call_id, reason: "unavailable" });
      }
      answer(msg).catch((err) => { fail("answer", err); hangup("error"); });
    } else if (msg.call_id !== phone.callId) {
      log(`ignored ${msg.type} for ${msg.call_id}`);
    } else if (msg.type === "answer") {
      pc.setRemoteDescription({ type: "answer", sdp: loopbackOnly(msg.sdp) })
        .then(() => setState("connecting"))
        .catch((err) => { fail("answer sdp", err); hangup("error"); });
    } else if (msg.type === "reject") {
      closeCall(`rejected_${msg.reason}`);
    } else if (msg.type === "hangup") {
      closeCall("remote_hangup");
    }
  }

  // --- media ----------------------------------------------------------------------
  function loopbackOnly(sdp) {
    // Keep only loopback candidates (the agent restricts itself the same way).
    return sdp.split("\r\n")
      .filter((l) => !l.startsWith("a=candidate:") || / 127\.0\.0\.1 /.test(l))
      .join("\r\n");
  }

  async function microphone() {
    if (!localStream) {
      localStream = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: false, noiseSuppression: false, autoGainControl: false },
        video: false,
      });
    }
    return localStream;
  }

  async function newPeerConnection() {
    pc = new RTCPeerConnection({ iceServers: [] });
    const stream = await microphone();
    for (const track of stream.getAudioTracks()) pc.addTrack(track, stream);
    pc.ontrack = (ev) => analyse(ev.streams[0] || new MediaStream([ev.track]));
    pc.onconnectionstatechange = () => {
      log(`connection ${pc.connectionState}`);
      if (pc.connectionState === "connected") {
        if (offerStartedAt !== null) phone.connectedMs = performance.now() - offerStartedAt;
        setState("active");
      } else if (pc.connectionState === "failed") {
        hangup("ice_failed");
      }
    };
  }

  function gathered() {
    return new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const check = () => {
        if (pc.iceGatheringState === "complete") {
          pc.removeEventListener("icegatheringstatechange", check);
          resolve();
        }
      };
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  async function dial(peer) {
    if (phone.state !== "idle") throw new Error(`busy (${phone.state})`);
    phone.callId = randomHex(8);
    phone.peer = peer;
    setState("offering");
    offerStartedAt = performance.now();
    await newPeerConnection();
    await pc.setLocalDescription(await pc.createOffer());
    await gathered();
    send(peer, "offer", {
      sdp: loopbackOnly(pc.localDescription.sdp),
      traceparent: `00-${randomHex(16)}-${randomHex(8)}-01`,
    });
    return phone.callId;
  }

  async function answer(offer) {
    phone.callId = offer.call_id;
    phone.peer = offer.from;
    setState("answering");
    offerStartedAt = performance.now();
    await newPeerConnection();
    await pc.setRemoteDescription({ type: "offer", sdp: loopbackOnly(offer.sdp) });
    await pc.setLocalDescription(await pc.createAnswer());
    await gathered();
    send(offer.from, "answer", { sdp: loopbackOnly(pc.localDescription.sdp) });
    setState("connecting");
  }

  function closeCall(reason) {
    if (pc) pc.close();
    pc = null;
    phone.endReason = reason;
    setState("idle");
    log(`call ${phone.callId} ended: ${reason}`);
  }

  function hangup(reason) {
    if (phone.callId && phone.peer && phone.state !== "idle") {
      send(phone.peer, "hangup", { reason: reason || "local_hangup" });
    }
    closeCall(reason || "local_hangup");
  }

  // --- what we hear ---------------------------------------------------------------
  // Chrome only feeds a remote WebRTC stream to WebAudio while a media element plays it.
  let audioCtx = null;
  function analyse(stream) {
    const sink = new Audio();
    sink.muted = true;
    sink.srcObject = stream;
    sink.play().catch((err) => log(`audio element: ${err}`));
    audioCtx = audioCtx || new AudioContext();
    audioCtx.resume();
    const analyser = audioCtx.createAnalyser();
    analyser.fftSize = 32768; // 1.46 Hz bins at 48 kHz
    analyser.smoothingTimeConstant = 0;
    // Measure the first channel as is: the default "speakers" downmix of a mono call
    // that arrives as stereo would halve (or average) what we report.
    analyser.channelCount = 1;
    analyser.channelCountMode = "explicit";
    analyser.channelInterpretation = "discrete";
    audioCtx.createMediaStreamSource(stream).connect(analyser);
    const freq = new Float32Array(analyser.frequencyBinCount);
    const time = new Float32Array(analyser.fftSize);
    const audio = {
      sample_rate: audioCtx.sampleRate, windows: 0, active_windows: 0,
      channels: stream.getAudioTracks().map((t) => t.getSettings().channelCount || null),
      peak_hz: null, level_dbfs: null, peaks: [], levels: [],
    };
    phone.audio = audio;
    const timer = setInterval(() => {
      if (pc === null) return clearInterval(timer);
      analyser.getFloatTimeDomainData(time);
      let sum = 0;
      for (const x of time) sum += x * x;
      const level = 10 * Math.log10(Math.max(sum / time.length, 1e-12));
      audio.windows += 1;
      audio.level_dbfs = level;
      if (level < -40) return;
      analyser.getFloatFrequencyData(freq);
      let best = 1;
      for (let i = 2; i < freq.length; i++) if (freq[i] > freq[best]) best = i;
      audio.active_windows += 1;
      audio.peak_hz = (best * audioCtx.sampleRate) / analyser.fftSize;
      audio.peaks.push(audio.peak_hz);
      audio.levels.push(level);
    }, 250);
  }

  // --- start ----------------------------------------------------------------------
  window.phoneDial = (peer) => dial(peer).catch((err) => { fail("dial", err); hangup("error"); });
  window.phoneHangup = (reason) => hangup(reason);

  window.addEventListener("load", () => {
    if (!brokerUrl) return fail("start", "no broker= parameter");
    client = mqtt.connect(brokerUrl, {
      clientId: `${me}-${randomHex(4)}`, protocolVersion: 5, reconnectPeriod: 500,
    });
    client.on("connect", () => {
      client.subscribe(`${prefix}/${me}/signal`, { qos: 1 }, (err) => {
        if (err) return fail("subscribe", err);
        phone.ready = true;
        log(`ready as ${me} on ${brokerUrl}`);
      });
    });
    client.on("message", (_topic, payload) => onSignal(payload.toString()));
    client.on("error", (err) => fail("mqtt", err));
    microphone().catch((err) => fail("getUserMedia", err));
  });
})();
