// Benchmark peer: a typical Node.js relay of the /realtime client protocol on the `ws` package,
// written the way people write one (JSON.parse / JSON.stringify, Buffer base64), competently:
// no per-frame logging. bench/relay.py compares our gateway against it.
//
// Protocol subset (SPEC §2, the part the benchmark exercises):
//   - on connect, open the upstream (?model= or the default model) with OPENAI_API_KEY, send a GA
//     session.update, wait for session.updated, then send {"type":"ready","session_id":...};
//     client messages that arrive before that are queued and sent after it;
//   - client binary frame (PCM16 24 kHz) -> input_audio_buffer.append (base64);
//   - client config -> session.update; commit / create_response / cancel_response / clear_audio;
//   - upstream response.output_audio.delta -> binary frame; transcript deltas -> transcript JSON;
//     VAD events -> speech_started/stopped; error -> error.
//
//   OPENAI_API_KEY=test-key-bench node relay.js --port 3022 --upstream-url ws://127.0.0.1:3002/v1/realtime
'use strict';

const { WebSocketServer, WebSocket } = require('ws');

function parseArgs(argv) {
  const args = { host: '127.0.0.1', port: 3022, upstreamUrl: 'wss://api.openai.com/v1/realtime' };
  for (let i = 2; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (flag === '--host') args.host = value;
    else if (flag === '--port') args.port = Number(value);
    else if (flag === '--upstream-url') args.upstreamUrl = value;
    else throw new Error(`unknown flag ${flag}`);
  }
  return args;
}

const DEFAULT_MODEL = 'gpt-realtime';
const SESSION_DEFAULTS = {
  type: 'realtime',
  output_modalities: ['audio'],
  audio: {
    input: {
      format: { type: 'audio/pcm', rate: 24000 },
      turn_detection: { type: 'server_vad', threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 },
    },
    output: { format: { type: 'audio/pcm', rate: 24000 }, voice: 'alloy' },
  },
};
const SIMPLE_COMMANDS = {
  commit: { type: 'input_audio_buffer.commit' },
  create_response: { type: 'response.create' },
  cancel_response: { type: 'response.cancel' },
  clear_audio: { type: 'input_audio_buffer.clear' },
};

function sessionFromConfig(config) {
  const session = { type: 'realtime' };
  if (config.instructions !== undefined) session.instructions = config.instructions;
  const audio = {};
  if (config.voice !== undefined) audio.output = { voice: config.voice };
  if (config.turn_detection !== undefined) {
    let detection = null;
    if (config.turn_detection !== 'none') {
      detection = { type: config.turn_detection };
      const vad = config.vad || {};
      if (config.turn_detection === 'server_vad') {
        for (const key of ['threshold', 'prefix_padding_ms', 'silence_duration_ms']) {
          if (vad[key] !== undefined) detection[key] = vad[key];
        }
      }
    }
    audio.input = { turn_detection: detection };
  }
  if (Object.keys(audio).length) session.audio = audio;
  return session;
}

function main() {
  const args = parseArgs(process.argv);
  const apiKey = process.env.OPENAI_API_KEY;
  if (!apiKey) {
    console.error('OPENAI_API_KEY is not set');
    process.exit(2);
  }
  const server = new WebSocketServer({ host: args.host, port: args.port });

  server.on('connection', (client, request) => {
    const model = new URL(request.url, 'http://relay').searchParams.get('model') || DEFAULT_MODEL;
    const upstream = new WebSocket(`${args.upstreamUrl}?model=${encodeURIComponent(model)}`, {
      headers: { Authorization: `Bearer ${apiKey}` },
    });
    let ready = false;
    const early = [];  // client messages received before ready, delivered in order after it

    const sendUpstream = (obj) => upstream.send(JSON.stringify(obj));
    const handleClientMessage = (data, isBinary) => {
      if (isBinary) {
        sendUpstream({ type: 'input_audio_buffer.append', audio: data.toString('base64') });
        return;
      }
      let command;
      try {
        command = JSON.parse(data.toString());
      } catch (err) {
        client.send(JSON.stringify({ type: 'error', code: 'InvalidMessage', message: 'invalid JSON' }));
        return;
      }
      if (command.type === 'config') sendUpstream({ type: 'session.update', session: sessionFromConfig(command) });
      else if (SIMPLE_COMMANDS[command.type]) sendUpstream(SIMPLE_COMMANDS[command.type]);
      else if (command.type === 'text') {
        sendUpstream({ type: 'conversation.item.create', item: {
          type: 'message', role: 'user', content: [{ type: 'input_text', text: command.text || '' }] } });
        if (command.respond !== false) sendUpstream({ type: 'response.create' });
      } else if (typeof command.type === 'string' && command.type.includes('.')) upstream.send(data.toString());
    };

    client.on('message', (data, isBinary) => {
      if (ready) handleClientMessage(data, isBinary);
      else early.push([data, isBinary]);
    });

    upstream.on('open', () => sendUpstream({ type: 'session.update', session: SESSION_DEFAULTS }));
    upstream.on('message', (data) => {
      const event = JSON.parse(data.toString());
      switch (event.type) {
        case 'response.output_audio.delta':
          client.send(Buffer.from(event.delta, 'base64'));
          break;
        case 'response.output_audio_transcript.delta':
          client.send(JSON.stringify({ type: 'transcript', role: 'assistant', text: event.delta, is_final: false,
            item_id: event.item_id, response_id: event.response_id }));
          break;
        case 'conversation.item.input_audio_transcription.completed':
          client.send(JSON.stringify({ type: 'transcript', role: 'user', text: event.transcript, is_final: true,
            item_id: event.item_id }));
          break;
        case 'input_audio_buffer.speech_started':
          client.send(JSON.stringify({ type: 'speech_started', audio_ms: event.audio_start_ms }));
          break;
        case 'input_audio_buffer.speech_stopped':
          client.send(JSON.stringify({ type: 'speech_stopped', audio_ms: event.audio_end_ms }));
          break;
        case 'session.updated':
          if (!ready) {
            ready = true;
            client.send(JSON.stringify({ type: 'ready', session_id: event.session.id }));
            for (const [data, isBinary] of early.splice(0)) handleClientMessage(data, isBinary);
          }
          break;
        case 'error':
          client.send(JSON.stringify({ type: 'error', code: 'UpstreamError',
            message: (event.error || {}).message || '', fatal: false }));
          break;
        default:
          break;
      }
    });

    upstream.on('close', () => client.close());
    upstream.on('error', (err) => {
      if (client.readyState === WebSocket.OPEN) {
        client.send(JSON.stringify({ type: 'error', code: 'ConnectionFailed', message: err.message, fatal: true }));
        client.close(1011, 'upstream error');
      }
    });
    client.on('close', () => upstream.close());
    client.on('error', () => upstream.close());
  });

  server.on('listening', () => console.log(`node ws relay listening on ${args.host}:${args.port}`));
  // Existing connections are not drained on stop: the benchmark stops the relay between points.
  const stop = () => process.exit(0);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

main();
