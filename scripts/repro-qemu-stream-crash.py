#!/usr/bin/env python3
# Reproduces QEMU 7.2's segfault in bdrv_refresh_filename at the end of a
# block-stream job (docs/design.md, "QEMU 7.2's stream crash"): a qcow2
# overlay over a qemu-nbd backing, one block-stream per QEMU, node-graph
# reads (query-named-block-nodes) while the job ends, N times.
#   repro-qemu-stream-crash.py MODE N [POLL]
#   MODE: speed (64 KiB/s, then block-job-set-speed 0) | pause (pause/resume) | nolimit
#   POLL: nodes (query-named-block-nodes + query-jobs) | qblock (query-block) | jobs (query-jobs only)
#   MANUAL=1: auto-finalize off, job-finalize + job-dismiss together (what the QEMU driver does)
# Prints each crashed iteration and "crashes=K/N". Temp files under /tmp/qc.
# Loop reproducer: qcow2 overlay over NBD backing, block-stream w/ speed, then set-speed 0.
import json, os, socket, subprocess, sys, time, tempfile
MODE = sys.argv[1]            # 'speed' | 'pause' | 'nolimit'
N = int(sys.argv[2])
POLL = sys.argv[3] if len(sys.argv) > 3 else 'nodes'   # 'nodes' | 'jobs' | 'none'
os.makedirs('/tmp/qc', exist_ok=True); d = tempfile.mkdtemp(dir='/tmp/qc')
base = f'{d}/base.raw'
subprocess.run(['qemu-img','create','-f','raw',base,'64M'],check=True,capture_output=True)
subprocess.run(['qemu-io','-f','raw','-c','write -P 0x5a 0 64M',base],check=True,capture_output=True)
nbdsock = f'{d}/nbd.sock'
nbd = subprocess.Popen(['qemu-nbd','-r','-f','raw','-k',nbdsock,'-e','8','--persistent',base])
while not os.path.exists(nbdsock): time.sleep(0.05)
class Q:
    def __init__(s, path):
        for _ in range(200):
            try:
                s.s = socket.socket(socket.AF_UNIX); s.s.connect(path); break
            except (ConnectionRefusedError, FileNotFoundError): time.sleep(0.05)
        s.f = s.s.makefile('rw')
        s.events = []; s.read(); s.cmd('qmp_capabilities')
    def read(s):
        l = s.f.readline()
        if not l: raise EOFError
        return json.loads(l)
    def cmd(s, ex, **a):
        s.f.write(json.dumps({'execute': ex, 'arguments': a})+'\n'); s.f.flush()
        while True:
            m = s.read()
            if 'event' in m: s.events.append(m); continue
            if 'error' in m: raise RuntimeError(m['error'])
            return m['return']
crashes = 0
for i in range(N):
    ov = f'{d}/ov{i}.qcow2'
    subprocess.run(['qemu-img','create','-f','qcow2','-F','raw','-b',f'nbd+unix:///?socket={nbdsock}',ov],check=True,capture_output=True)
    qs = f'{d}/qmp{i}.sock'
    q = subprocess.Popen(['qemu-system-x86_64','-machine','q35','-accel','tcg','-nodefaults','-display','none','-S',
        '-qmp',f'unix:{qs},server=on,wait=off',
        '-blockdev',json.dumps({'driver':'nbd','node-name':'b0','server':{'type':'unix','path':nbdsock},'read-only':True}),
        '-blockdev',json.dumps({'driver':'file','node-name':'f0','filename':ov}),
        '-blockdev',json.dumps({'driver':'qcow2','node-name':'q0','file':'f0','backing':'b0'}),
        '-device','virtio-blk-pci,drive=q0,id=vd0'])
    while not os.path.exists(qs): time.sleep(0.02)
    m = Q(qs); last = None
    try:
        args = {'job-id':'j','device':'q0','auto-dismiss':False}
        if MODE == 'speed': args['speed'] = 65536
        if os.environ.get('MANUAL'): args['auto-finalize'] = False
        if os.environ.get('FILTER'): args['filter-node-name'] = 'cor0'
        m.cmd('block-stream', **args)
        if MODE == 'pause': m.cmd('block-job-pause', device='j')
        time.sleep(0.3)
        if POLL=='nodes': m.cmd('query-named-block-nodes', flat=True)
        if MODE == 'speed': m.cmd('block-job-set-speed', device='j', speed=0)
        if MODE == 'pause': m.cmd('block-job-resume', device='j')
        while True:
            if POLL=='nodes': m.cmd('query-named-block-nodes', flat=True)
            if POLL=='qblock': m.cmd('query-block')
            js = m.cmd('query-jobs'); last = [(j['status'], j['current-progress'], j['total-progress']) for j in js]
            if js and js[0]['status'] == 'concluded': break
            if js and js[0]['status'] == 'pending' and os.environ.get('MANUAL'):
                m.cmd('job-finalize', id='j'); m.cmd('job-dismiss', id='j'); break
            if POLL=='none': time.sleep(0.02)
        if not os.environ.get('MANUAL'): m.cmd('job-dismiss', id='j')
        if POLL=='nodes': m.cmd('query-named-block-nodes', flat=True)
        m.cmd('quit')
    except (EOFError, ConnectionResetError, BrokenPipeError):
        pass
    rc = q.wait()
    if rc != 0:
        crashes += 1; print(f'iter {i}: qemu rc={rc} last={last if "last" in dir() else None}', flush=True)
    os.unlink(ov)
nbd.terminate(); nbd.wait()
print(f'MODE={MODE} POLL={POLL} crashes={crashes}/{N}')
