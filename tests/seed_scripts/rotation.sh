#!/bin/bash
# "Backup Rotation" from seed-backup-api.md, minimally corrected: as printed,
# `date -d "20241110_120000"` fails on GNU date, so the timestamp is rewritten to
# "20241110 12:00:00" first (the one changed line is marked).
# Keep only last 7 days of backups

# Get list of backups
BACKUPS=$(curl -s -X GET "http://localhost:8081/backup/list" -H "Authorization: Bearer $ACCESS_TOKEN" | jq -r '.backups[].filename')

# Delete backups older than 7 days
for backup in $BACKUPS; do
  AGE=$(date -d "$(echo $backup | grep -oP '\d{8}_\d{6}' | sed -E 's/(.{8})_(..)(..)(..)/\1 \2:\3:\4/')" +%s)  # corrected
  NOW=$(date +%s)
  DIFF=$(( (NOW - AGE) / 86400 ))
  
  if [ $DIFF -gt 7 ]; then
    curl -X DELETE "http://localhost:8081/backup/delete/$backup" -H "Authorization: Bearer $ACCESS_TOKEN"
    echo "Deleted old backup: $backup"
  fi
done
