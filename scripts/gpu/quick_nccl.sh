set -uo pipefail
export NCCL_NVLS_ENABLE=0
ninja -C build-multi -j32 shardlm > /tmp/b.log 2>&1 || { grep error -A3 /tmp/b.log | head; exit 1; }
bin=build-multi/apps/shardlm/shardlm
mp="mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x SHARDLM_COMM -np 2"
args="generate --backend cuda -m /tmp/s.gguf --prompt-ids 1,400,300,500,264,280 -n 24 --greedy --ignore-eos --json -q --kv-type f32"
SHARDLM_COMM=nccl timeout 40 $mp $bin $args --tp 2 > /tmp/r.txt 2>&1; echo "nccl tp2 graphs rc=$?: $(grep generated /tmp/r.txt)"
ls /tmp/m.gguf && SHARDLM_COMM=nccl timeout 100 $bin bench --backend cuda -m /tmp/m.gguf --tp 2 -p 512 -n 128 -r 3 -q --kv-type f16 --json > $OUT/b.json 2>$OUT/b.err; echo "bench rc=$?"; python3 -c "import json;d=json.load(open('$OUT/b.json'));print('pp512 %.0f tg128 %.1f comm %.3f roof %.1f bw %.0f' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['tg']['comm_share'],d['roofline_tokens_per_s'],d['bandwidth_bytes_per_s']/1e9))"
